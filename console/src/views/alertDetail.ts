// One alert: its timeline (raises, acknowledgements, comments, escalations…)
// beside a chart of the series that raised it, with the rule's thresholds
// and the events marked on the time axis. Updates live.

import { ACTIONS, actionLabel, askInput, mayAct, runAction } from "../actions";
import type { ActionName } from "../actions";
import { api, ApiError, query } from "../api";
import { SeriesChart, thresholdsFor } from "../charts";
import type { Marker } from "../charts";
import type { AppContext, View } from "../context";
import { h, replaceChildren } from "../dom";
import { formatDateTime, formatDuration, formatNumber } from "../format";
import { t, tDynamic } from "../i18n";
import { href } from "../router";
import { severityBadge, stateLabel } from "../severity";
import { store } from "../store";
import type { Alert, AlertEvent, SeriesHistory } from "../types";
import { normalizeAlert, normalizeEvent, parseTime } from "../types";
import { districtLabel, domainLabel } from "./alerts";

const MARKER_COLORS: Record<string, string> = {
  raise: "#ff4d5a",
  escalate: "#ff9f1a",
  acknowledge: "#3ecf8e",
  resolve: "#3ecf8e",
  clear: "#9aa0aa",
  comment: "#5aa9ff",
};

export class AlertDetailView implements View {
  readonly el: HTMLElement;
  private alert: Alert | null = null;
  private events: AlertEvent[] = [];
  private chart: SeriesChart | null = null;
  private readonly head: HTMLElement;
  private readonly bar: HTMLElement;
  private readonly props: HTMLElement;
  private readonly timeline: HTMLElement;
  private readonly chartBox: HTMLElement;
  private readonly unsubscribe: (() => void)[] = [];
  private reloadTimer: number | null = null;
  private busy = false;
  private chartFor = "";
  private markers: Marker[] = [];

  constructor(
    private readonly ctx: AppContext,
    private readonly id: string,
  ) {
    this.head = h("div", { class: "detail-head" }, h("h1", null, t("alert.title")));
    this.bar = h("div", { class: "actions-bar", role: "toolbar", "aria-label": t("alert.title") });
    this.props = h("dl", { class: "props" });
    this.timeline = h("ol", { class: "timeline", "aria-label": t("alert.timeline") });
    this.chartBox = h("div", { class: "chart-box" });
    this.el = h(
      "article",
      { class: "page page-alert", "data-alert-id": id },
      h("p", null, h("a", { href: href({ name: "alerts" }) }, `← ${t("alert.back")}`)),
      this.head,
      this.bar,
      h(
        "div",
        { class: "detail-grid" },
        h(
          "div",
          null,
          h("section", { class: "panel", "aria-labelledby": "alert-details" }, h("h2", { id: "alert-details" }, t("alert.details")), this.props),
          h("section", { class: "panel", "aria-labelledby": "alert-timeline", style: "margin-top: 14px" }, h("h2", { id: "alert-timeline" }, t("alert.timeline")), this.timeline),
        ),
        h("section", { class: "panel", "aria-labelledby": "alert-chart" }, h("h2", { id: "alert-chart" }, t("alert.chart")), this.chartBox),
      ),
    );
    this.unsubscribe.push(
      store.alertChanged.on((entry) => {
        if (entry.alert.id === this.id) this.scheduleReload();
      }),
    );
    void this.load();
  }

  title(): string {
    return this.alert ? `${this.alert.message || this.alert.subject}` : t("alert.title");
  }

  destroy(): void {
    for (const fn of this.unsubscribe) fn();
    if (this.reloadTimer !== null) window.clearTimeout(this.reloadTimer);
    this.chart?.destroy();
  }

  private scheduleReload(): void {
    if (this.reloadTimer !== null) return;
    this.reloadTimer = window.setTimeout(() => {
      this.reloadTimer = null;
      void this.load();
    }, 300);
  }

  private async load(): Promise<void> {
    try {
      const raw = await api<Record<string, unknown>>("GET", `/api/v1/alerts/${encodeURIComponent(this.id)}`);
      this.alert = normalizeAlert(raw);
      this.events = ((raw["events"] as Record<string, unknown>[]) ?? []).map(normalizeEvent);
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 404) {
        replaceChildren(this.head, h("h1", null, t("alert.notFound", { id: this.id })));
        return;
      }
      this.ctx.toast(t("action.failed", { message: exc instanceof Error ? exc.message : String(exc) }), "error");
      return;
    }
    this.render();
  }

  private current(): Alert | null {
    const live = store.alerts.get(this.id);
    if (live && this.alert && live.version > this.alert.version) return { ...this.alert, ...live };
    return this.alert;
  }

  private render(): void {
    const a = this.current();
    if (!a) return;
    this.el.dataset["state"] = a.state;
    this.el.dataset["version"] = String(a.version);
    replaceChildren(
      this.head,
      severityBadge(a.severity),
      h("h1", null, a.message || a.subject),
      h("span", { class: `state-label state-${a.state}`, "data-state": a.state }, stateLabel(a.state)),
    );
    this.renderActions(a);
    const device = a.device_id
      ? h("a", { href: href({ name: "device", id: a.device_id }) }, a.device_id)
      : "—";
    const rows: [string, Node | string][] = [
      [t("alert.rule"), `${a.rule_name || a.rule_id} (${a.rule_id})`],
      [t("alert.subject"), a.subject],
      [t("alert.device"), device],
      [t("device.channel"), a.channel ?? "—"],
      [t("alert.value"), formatNumber(a.value)],
      [t("alerts.col.district"), districtLabel(a.district)],
      [t("device.domain"), domainLabel(a.domain) || "—"],
      [t("alerts.col.raised"), `${formatDateTime(a.raised_at)} (${formatDuration(Date.now() / 1000 - a.raised_at)})`],
      [t("alert.ackedBy"), a.acked_by ? `${a.acked_by} · ${formatDateTime(a.acked_at)}` : "—"],
      [t("alert.ackRole"), a.ack_role ? tDynamic(`role.${a.ack_role}`, a.ack_role) : "—"],
      [t("alerts.col.assignee"), a.assignee ?? "—"],
      [t("alert.occurrences"), String(a.occurrences)],
      [t("alert.escalation"), String(a.escalation_level)],
    ];
    if (a.shelved_until) rows.push([t("alert.shelvedUntil"), `${formatDateTime(a.shelved_until)} · ${a.shelve_reason ?? ""}`]);
    if (a.chattering) rows.push([t("alert.chattering"), "✓"]);
    replaceChildren(this.props, ...rows.flatMap(([k, v]) => [h("dt", null, k), h("dd", null, v)]));
    replaceChildren(
      this.timeline,
      ...this.events.map((e) =>
        h(
          "li",
          { "data-action": e.action, "data-version": e.version },
          h("span", { class: "tl-time" }, formatDateTime(e.at)),
          " ",
          h("span", { class: "tl-what" }, tDynamic(`event.${e.action}`, e.action)),
          " ",
          h("span", { class: "tl-who" }, t("event.by", { actor: e.actor })),
          e.from_state !== e.to_state ? h("span", { class: "sub" }, ` · ${stateLabel(e.from_state)} → ${stateLabel(e.to_state)}`) : null,
          e.notify ? h("span", { class: "sub" }, ` · ${t("event.notify", { role: tDynamic(`role.${e.notify}`, e.notify) })}`) : null,
          e.note ? h("p", { class: "tl-note" }, e.note) : null,
        ),
      ),
    );
    void this.renderChart(a);
  }

  private renderActions(a: Alert): void {
    const offered = ACTIONS.filter((action) => mayAct(this.ctx.me, a, action));
    replaceChildren(
      this.bar,
      ...offered.map((action) =>
        h(
          "button",
          {
            type: "button",
            class: `btn btn-small${action === "acknowledge" ? " btn-primary" : ""}`,
            "data-action": action,
            disabled: this.busy,
            onclick: () => void this.act(action),
          },
          actionLabel(action),
        ),
      ),
    );
  }

  private async act(action: ActionName): Promise<void> {
    const a = this.current();
    if (!a || this.busy) return;
    let input = {};
    if (action !== "acknowledge" && action !== "unshelve") {
      const asked = await askInput(action, a);
      if (!asked) return;
      input = asked;
    }
    this.busy = true;
    this.renderActions(a);
    const result = await runAction(action, store.alerts.get(a.id) ?? a, input);
    this.busy = false;
    this.ctx.toast(result.message, result.ok ? "success" : "error");
    await this.load();
  }

  private async renderChart(a: Alert): Promise<void> {
    const markers: Marker[] = this.events
      .filter((e) => MARKER_COLORS[e.action])
      .map((e) => ({ at: e.at, label: tDynamic(`event.${e.action}`, e.action), color: MARKER_COLORS[e.action]! }));
    if (!a.device_id || !a.channel) {
      replaceChildren(this.chartBox, h("p", { class: "chart-note" }, t("alert.noSeries")));
      return;
    }
    const now = Date.now() / 1000;
    const start = a.raised_at - 30 * 60;
    const end = Math.min(now, (a.closed_at ?? now) + 5 * 60);
    const key = `${a.device_id}/${a.channel}/${Math.floor(start)}/${Math.floor(end / 60)}`;
    this.markers = markers;
    if (this.chart && key === this.chartFor) {
      this.chart.setMarkers(markers);
      return;
    }
    this.chartFor = key;
    let history: SeriesHistory;
    try {
      history = await api<SeriesHistory>(
        "GET",
        `/api/v1/devices/${encodeURIComponent(a.device_id)}/series/${encodeURIComponent(a.channel)}/history${query({
          start: new Date(start * 1000).toISOString(),
          end: new Date(end * 1000).toISOString(),
          run: a.source === "replay" ? (store.runId ?? null) : null,
        })}`,
      );
    } catch (exc) {
      replaceChildren(this.chartBox, h("p", { class: "chart-note" }, exc instanceof Error ? exc.message : String(exc)));
      return;
    }
    const rec = store.devices.get(a.device_id);
    const thresholds = thresholdsFor(
      { id: a.device_id, kind: rec?.kind ?? null, domain: rec?.domain ?? a.domain ?? "", district: rec?.district ?? a.district },
      a.channel,
    );
    this.chart?.destroy();
    const band = history.bucket !== "raw" && history.kind === "numeric";
    this.chart = new SeriesChart({
      label: `${a.device_id} · ${a.channel}`,
      unit: history.unit,
      thresholds,
      markers,
      band,
      // The range asked for, stretched to the events: they are marked even
      // when the rule evaluated later than the readings' device time.
      xRange: () => {
        const times = this.markers.map((m) => m.at);
        return [Math.min(start, ...times) - 60, Math.max(end, ...times) + 60];
      },
    });
    replaceChildren(
      this.chartBox,
      h("h3", null, `${a.device_id} · ${a.channel}`, h("span", { class: "unit" }, history.unit ?? ""), h("span", { class: "unit" }, t("device.bucket", { bucket: history.bucket }))),
      this.chart.el,
      history.kind === "state" ? stateList(history) : null,
    );
    const xs: number[] = [];
    const ys: (number | null)[] = [];
    const mins: (number | null)[] = [];
    const maxs: (number | null)[] = [];
    for (const p of history.points) {
      const ts = parseTime(p.ts);
      if (ts === null) continue;
      xs.push(ts);
      ys.push(band ? p.avg : (p.value ?? null));
      mins.push(p.min);
      maxs.push(p.max);
    }
    this.chart.setData(xs, ys, mins, maxs);
  }
}

/** A state series as its list of changes. */
export function stateList(history: SeriesHistory): HTMLElement {
  const items: HTMLElement[] = [];
  let last: string | null = null;
  for (const p of history.points) {
    if (p.state === null || p.state === last) continue;
    last = p.state;
    items.push(h("li", null, h("span", { class: "tl-time" }, formatDateTime(parseTime(p.ts))), h("strong", null, p.state)));
  }
  return h("div", null, h("h3", null, t("device.stateSeries")), h("ol", { class: "state-steps" }, ...items.reverse()));
}
