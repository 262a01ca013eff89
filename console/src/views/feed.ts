// The live alert feed beside the map: alert events as they arrive, newest first.

import { h, replaceChildren } from "../dom";
import { formatTime } from "../format";
import { t, tDynamic } from "../i18n";
import { href } from "../router";
import { severityBadge, stateLabel } from "../severity";
import type { FeedEntry } from "../store";
import { store } from "../store";
import { districtLabel } from "./alerts";

const SHOWN = 100;

export class AlertFeed {
  readonly el: HTMLElement;
  private readonly list: HTMLOListElement;
  private readonly empty: HTMLElement;
  private readonly title: HTMLElement;
  private past = false;
  private readonly unsubscribe: (() => void)[] = [];

  constructor() {
    this.list = h("ol", { class: "feed", "aria-live": "polite", "aria-relevant": "additions", id: "alert-feed" });
    this.empty = h("p", { class: "feed-empty" }, t("overview.feedEmpty"));
    this.title = h("h2", { id: "feed-title" }, t("overview.feed"));
    this.el = h(
      "section",
      { class: "feed-panel live-panel", "aria-labelledby": "feed-title" },
      this.title,
      this.empty,
      this.list,
    );
    this.rebuild();
    this.unsubscribe.push(
      store.reset.on(() => this.rebuild()),
      store.alertChanged.on((entry) => {
        if (entry.fresh && !this.past) this.prepend(entry);
      }),
    );
  }

  destroy(): void {
    for (const fn of this.unsubscribe) fn();
  }

  /** Show entries from another source (the time slider's past), or the live feed with null. */
  showEntries(entries: FeedEntry[] | null): void {
    this.past = entries !== null;
    this.el.dataset["mode"] = this.past ? "history" : "live";
    this.title.textContent = this.past ? t("slider.alertsAt") : t("overview.feed");
    this.empty.textContent = this.past ? t("slider.noAlerts") : t("overview.feedEmpty");
    if (entries === null) {
      this.rebuild();
      return;
    }
    replaceChildren(this.list, ...entries.slice(0, SHOWN).map((e) => this.item(e, false)));
    this.empty.hidden = entries.length > 0;
  }

  private rebuild(): void {
    replaceChildren(this.list, ...store.feed.slice(0, SHOWN).map((e) => this.item(e, false)));
    this.empty.hidden = store.feed.length > 0;
  }

  private prepend(entry: FeedEntry): void {
    this.list.prepend(this.item(entry, true));
    while (this.list.children.length > SHOWN) this.list.lastElementChild?.remove();
    this.empty.hidden = true;
  }

  private item(entry: FeedEntry, isNew: boolean): HTMLElement {
    const { alert, event } = entry;
    const critical = isNew && alert.severity === "critical" && (event.action === "raise" || event.action === "escalate");
    const action = tDynamic(`event.${event.action}`, event.action);
    return h(
      "li",
      {
        class: `feed-item sev-${alert.severity}${isNew ? " is-new" : ""}${critical ? " is-critical-new" : ""}`,
        "data-alert-id": alert.id,
        "data-action": event.action,
      },
      severityBadge(alert.severity),
      h("a", { href: href({ name: "alert", id: alert.id }) }, alert.message || alert.subject),
      h(
        "span",
        { class: "feed-meta" },
        `${formatTime(event.at || entry.receivedAt)} · ${action}${event.actor && event.actor !== "cityops" ? ` (${event.actor})` : ""} · ${stateLabel(alert.state)} · ${districtLabel(alert.district)}`,
      ),
    );
  }
}
