// The time slider: scrub back over the last hours and see the map and the
// alert states as they were.
//
// Alerts at time T come from the alerts' own times (raised, acknowledged,
// cleared, closed), which the API writes from their events: an alert is open
// at T when it was raised before T and not closed by T; acknowledged when its
// acknowledgement is before T; cleared likewise. (An alert that cleared and
// was raised again shows its latest cycle.)
//
// Device state at T is approximated from history buckets: for every device
// kind, the group history of one of its channels (15-minute buckets) says how
// many devices of the kind reported in the bucket holding T. A kind where
// (nearly) all reported is drawn online; a kind with gaps is drawn "unknown",
// because the buckets do not say which devices were silent; devices with an
// offline or silence alert open at T are drawn offline. The panel lists the
// reporting share of each kind.

import { api, mapLimit, query } from "../api";
import type { AppContext } from "../context";
import { h, replaceChildren, setText } from "../dom";
import { formatDateTime } from "../format";
import { t } from "../i18n";
import { severityRank } from "../severity";
import type { FeedEntry } from "../store";
import { store } from "../store";
import type { Alert, AlertState, GroupHistory } from "../types";
import { normalizeAlert, parseTime } from "../types";
import type { AlertFeed } from "./feed";
import type { CityMap, MapOverride } from "./map";

const HOURS = 6;
const BUCKET_S = 15 * 60;
const MAX_PAGES = 4;
const CACHE_S = 60;
/** Rules whose alerts mean "this device is not reporting". */
const PRESENCE_RULE = /offline|silent|no[-_]?data/i;

interface KindHistory {
  kind: string;
  total: number;
  /** Bucket start (epoch s) → devices that reported. */
  buckets: Map<number, number>;
}

interface History {
  loadedAt: number;
  start: number;
  alerts: Alert[];
  kinds: KindHistory[];
}

export class TimeSlider {
  readonly el: HTMLElement;
  private readonly range: HTMLInputElement;
  private readonly label: HTMLElement;
  private readonly back: HTMLButtonElement;
  private readonly note: HTMLElement;
  private readonly reporting: HTMLElement;
  private history: History | null = null;
  private loading: Promise<History> | null = null;
  private timer: number | null = null;
  private destroyed = false;

  constructor(
    private readonly ctx: AppContext,
    private readonly map: CityMap,
    private readonly feed: AlertFeed,
  ) {
    this.range = h("input", {
      id: "time-slider",
      type: "range",
      min: -HOURS * 60,
      max: 0,
      step: 1,
      value: 0,
      "aria-describedby": "time-slider-note",
    });
    this.label = h("span", { class: "slider-label", "aria-live": "polite", id: "time-slider-value" }, t("slider.live"));
    this.back = h("button", { type: "button", class: "btn btn-small", hidden: true }, t("slider.back"));
    this.note = h("p", { class: "slider-note", id: "time-slider-note" }, t("slider.hint", { hours: HOURS }));
    this.reporting = h("ul", { class: "reporting", "aria-label": t("slider.reporting") });
    this.range.addEventListener("input", () => this.changed());
    this.back.addEventListener("click", () => {
      this.range.value = "0";
      this.changed();
    });
    this.el = h(
      "section",
      { class: "slider-panel", "aria-label": t("slider.label") },
      h("label", { for: "time-slider" }, t("slider.label")),
      this.range,
      this.label,
      this.back,
      this.note,
      this.reporting,
    );
  }

  destroy(): void {
    this.destroyed = true;
    if (this.timer !== null) window.clearTimeout(this.timer);
  }

  private minutes(): number {
    return Number(this.range.value);
  }

  private changed(): void {
    const m = this.minutes();
    this.range.setAttribute("aria-valuetext", m === 0 ? t("slider.live") : t("slider.at", { time: formatDateTime(Date.now() / 1000 + m * 60) }));
    if (m === 0) {
      if (this.timer !== null) window.clearTimeout(this.timer);
      this.live();
      return;
    }
    setText(this.label, t("slider.at", { time: formatDateTime(Date.now() / 1000 + m * 60) }));
    // Scrubbing fires many input events: compute once it settles.
    if (this.timer !== null) window.clearTimeout(this.timer);
    this.timer = window.setTimeout(() => void this.showAt(Date.now() / 1000 + this.minutes() * 60), 120);
  }

  private live(): void {
    setText(this.label, t("slider.live"));
    this.back.hidden = true;
    this.el.dataset["mode"] = "live";
    setText(this.note, t("slider.hint", { hours: HOURS }));
    replaceChildren(this.reporting);
    this.map.setOverride(null);
    this.feed.showEntries(null);
  }

  private async showAt(at: number): Promise<void> {
    this.back.hidden = false;
    this.el.dataset["mode"] = "history";
    let history: History;
    try {
      if (!this.history || Date.now() / 1000 - this.history.loadedAt > CACHE_S) {
        setText(this.note, t("slider.loading"));
        this.loading ??= this.load();
        this.history = await this.loading;
        this.loading = null;
      }
      history = this.history;
    } catch (exc) {
      this.loading = null;
      this.ctx.toast(t("action.failed", { message: exc instanceof Error ? exc.message : String(exc) }), "error");
      return;
    }
    if (this.destroyed || this.minutes() === 0) return;
    const { override, entries, kinds } = this.stateAt(history, at);
    this.map.setOverride(override);
    this.feed.showEntries(entries);
    setText(this.note, t("slider.approx"));
    replaceChildren(
      this.reporting,
      ...kinds.map((k) => h("li", null, t("slider.reportingKind", { kind: k.kind, reporting: k.reporting, total: k.total }))),
    );
    this.el.dataset["shownAt"] = String(Math.round(at));
  }

  private async load(): Promise<History> {
    const now = Date.now() / 1000;
    const start = now - HOURS * 3600;
    const source = store.source;
    // Alerts raised in the window (newest first, a few pages), plus those open now.
    const byId = new Map<string, Alert>();
    let cursor: string | null = null;
    for (let page = 0; page < MAX_PAGES; page++) {
      const res: { items: Record<string, unknown>[]; next_cursor: string | null } = await api(
        "GET",
        `/api/v1/alerts${query({ source, limit: 500, cursor })}`,
      );
      const items = res.items.map(normalizeAlert);
      for (const a of items) byId.set(a.id, a);
      cursor = res.next_cursor;
      const oldest = items[items.length - 1];
      if (!cursor || !oldest || oldest.raised_at < start) break;
    }
    for (const a of store.alerts.values()) if (!byId.has(a.id)) byId.set(a.id, a);

    // Reporting per device kind (the sandbox has no kinds: alerts only there).
    const kinds: KindHistory[] = [];
    if (source === "live") {
      const byKind = new Map<string, { total: number; channels: Map<string, number> }>();
      for (const rec of store.deviceList) {
        if (!rec.kind) continue;
        let k = byKind.get(rec.kind);
        if (!k) byKind.set(rec.kind, (k = { total: 0, channels: new Map() }));
        k.total++;
        for (const ch of rec.series.keys()) k.channels.set(ch, (k.channels.get(ch) ?? 0) + 1);
        const declared = store.city?.kinds[rec.kind]?.channels[0];
        if (declared) k.channels.set(declared, (k.channels.get(declared) ?? 0) + 0.5);
      }
      const wanted = [...byKind.entries()]
        .map(([kind, k]) => ({ kind, total: k.total, channel: [...k.channels.entries()].sort((a, b) => b[1] - a[1])[0]?.[0] }))
        .filter((k): k is { kind: string; total: number; channel: string } => k.channel !== undefined);
      const startIso = new Date(Math.floor(start / BUCKET_S) * BUCKET_S * 1000).toISOString();
      const endIso = new Date(now * 1000).toISOString();
      const results = await mapLimit(wanted, 4, async (k) => {
        try {
          const g = await api<GroupHistory>(
            "GET",
            `/api/v1/history/group${query({ channel: k.channel, kind: k.kind, start: startIso, end: endIso, bucket: "15m" })}`,
          );
          const buckets = new Map<number, number>();
          for (const p of g.points) {
            const ts = parseTime(p.ts);
            if (ts !== null) buckets.set(Math.floor(ts / BUCKET_S) * BUCKET_S, p.devices ?? 0);
          }
          return { kind: k.kind, total: k.total, buckets };
        } catch {
          return null;
        }
      });
      for (const r of results) if (r) kinds.push(r);
    }
    return { loadedAt: now, start, alerts: [...byId.values()], kinds };
  }

  private stateAt(history: History, at: number): { override: MapOverride; entries: FeedEntry[]; kinds: { kind: string; reporting: number; total: number }[] } {
    const worst = new Map<string, number>();
    const status = new Map<string, 0 | 1 | 2 | 3>();
    const entries: FeedEntry[] = [];
    const silent = new Set<string>();
    for (const a of history.alerts) {
      const state = stateAt(a, at);
      if (state === null) continue;
      const asThen: Alert = { ...a, state };
      entries.push({
        alert: asThen,
        event: { version: a.version, action: "raise", from_state: "normal", to_state: state, actor: "cityops", at: a.raised_at, note: "", notify: null },
        receivedAt: a.raised_at,
        fresh: false,
      });
      if (a.device_id) {
        if (state !== "shelved") worst.set(a.device_id, Math.min(worst.get(a.device_id) ?? 99, severityRank(a.severity)));
        if (PRESENCE_RULE.test(a.rule_id)) silent.add(a.device_id);
      }
    }
    entries.sort((x, y) => y.alert.raised_at - x.alert.raised_at);
    const bucket = Math.floor(at / BUCKET_S) * BUCKET_S;
    const kinds: { kind: string; reporting: number; total: number }[] = [];
    const kindOnline = new Map<string, boolean>();
    for (const k of history.kinds) {
      const reporting = Math.min(k.total, k.buckets.get(bucket) ?? 0);
      kinds.push({ kind: k.kind, reporting, total: k.total });
      kindOnline.set(k.kind, reporting >= k.total * 0.95);
    }
    kinds.sort((a, b) => a.kind.localeCompare(b.kind));
    for (const rec of store.deviceList) {
      if (silent.has(rec.id)) status.set(rec.id, 1);
      else if (rec.kind && kindOnline.get(rec.kind)) status.set(rec.id, 0);
    }
    return { override: { worst, status }, entries, kinds };
  }
}

/** The state an alert had at `at` (null: not open then), from its own times. */
export function stateAt(a: Alert, at: number): AlertState | null {
  if (a.raised_at > at) return null;
  if (a.closed_at !== null && a.closed_at <= at) return null;
  const acked = a.acked_at !== null && a.acked_at <= at;
  const cleared = a.cleared_at !== null && a.cleared_at <= at && a.cleared_at >= a.raised_at;
  if (cleared) return acked ? null : "cleared_unacked";
  return acked ? "active_acked" : "active_unacked";
}
