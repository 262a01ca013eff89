// City overview: the map, the live alert feed, and the time slider.

import type { AppContext, View } from "../context";
import { h } from "../dom";
import { t } from "../i18n";
import { navigate } from "../router";
import { AlertFeed } from "./feed";
import { CityMap } from "./map";
import { TimeSlider } from "./timeslider";

export class OverviewView implements View {
  readonly el: HTMLElement;
  private readonly map: CityMap;
  private readonly feed: AlertFeed;
  private readonly slider: TimeSlider;

  constructor(ctx: AppContext) {
    this.map = new CityMap((id) => navigate({ name: "device", id }));
    this.feed = new AlertFeed();
    this.slider = new TimeSlider(ctx, this.map, this.feed);
    this.el = h(
      "section",
      { class: "page-overview", "aria-label": t("overview.title") },
      h("h1", { class: "visually-hidden" }, t("overview.title")),
      this.map.el,
      this.feed.el,
      this.slider.el,
    );
  }

  title(): string {
    return t("overview.title");
  }

  destroy(): void {
    this.slider.destroy();
    this.map.destroy();
    this.feed.destroy();
  }
}
