// One device: latest values (live), presence and its history, its alerts, and
// charts of its series: live (the last 15 minutes, updating) or history (a
// range picker; the API chooses the bucket), with rule thresholds drawn.

import { api, ApiError, query } from "../api";
import { LiveSeries, SeriesChart, thresholdsFor } from "../charts";
import type { AppContext, View } from "../context";
import { h, replaceChildren, setText } from "../dom";
import { formatDateTime, formatNumber, fromLocalInput, getTimeZone, toLocalInput, zoneOffsetLabel } from "../format";
import { t, tDynamic } from "../i18n";
import type { MessageKey } from "../i18n";
import { href } from "../router";
import { severityBadge, stateLabel } from "../severity";
import { store } from "../store";
import type { ReadingItem } from "../store";
import type { Alert, SeriesHistory } from "../types";
import { normalizeAlert, parseTime } from "../types";
import { stateList } from "./alertDetail";
import { districtLabel, domainLabel } from "./alerts";

interface DeviceDetail {
  id: string;
  domain: string;
  district: string;
  kind: string | null;
  name: string | null;
  lat: number | null;
  lon: number | null;
  presence: "online" | "offline" | "unknown";
  stale_since: string | null;
  out_of_service: boolean;
  last_seen: string | null;
  expected_period_s: number | null;
  presence_changed_at: string | null;
  first_seen: string | null;
  series: { series_id: number; channel: string; unit: string | null; ts: string | null; value: number | null; state: string | null }[];
}

type Mode = "live" | "history";
const RANGES: [string, number][] = [["1h", 3600], ["6h", 6 * 3600], ["24h", 86400], ["7d", 7 * 86400]];
const MAX_CHARTS = 8;

/** Kept across visits: the chart mode and range. */
const memory = { mode: "live" as Mode, rangeS: 6 * 3600, from: null as number | null, to: null as number | null };

export class DeviceView implements View {
  readonly el: HTMLElement;
  private detail: DeviceDetail | null = null;
  private readonly head: HTMLElement;
  private readonly info: HTMLElement;
  private readonly values: HTMLElement;
  private readonly presence: HTMLElement;
  private readonly changes: HTMLOListElement;
  private readonly alerts: HTMLElement;
  private readonly charts: HTMLElement;
  private readonly controls: HTMLElement;
  private live = new Map<string, LiveSeries>();
  private made: SeriesChart[] = [];
  private readonly unsubscribe: (() => void)[] = [];
  private lastPresence: string | null = null;
  private chartRequest = 0;

  constructor(
    private readonly ctx: AppContext,
    private readonly id: string,
  ) {
    this.head = h("div", { class: "detail-head" }, h("h1", null, t("device.title", { id })));
    this.info = h("dl", { class: "props" });
    this.values = h("table", { class: "values" });
    this.presence = h("div", { class: "presence-strip", role: "img" });
    this.changes = h("ol", { class: "state-steps", "aria-label": t("device.presenceChanges") });
    this.alerts = h("ul", { class: "state-steps" });
    this.controls = h("div", { class: "tabs", role: "tablist", "aria-label": t("device.charts") });
    this.charts = h("div", { role: "tabpanel", id: "device-charts" });
    this.el = h(
      "article",
      { class: "page page-device", "data-device-id": id },
      this.head,
      h(
        "div",
        { class: "detail-grid" },
        h(
          "div",
          null,
          h("section", { class: "panel" }, h("h2", null, t("alert.details")), this.info),
          h("section", { class: "panel", style: "margin-top: 14px" }, h("h2", null, t("device.latest")), this.values),
          h(
            "section",
            { class: "panel", style: "margin-top: 14px" },
            h("h2", null, t("device.presenceHistory")),
            h("p", { class: "chart-note" }, t("device.presenceHistoryHelp")),
            this.presence,
            h("h3", null, t("device.presenceChanges")),
            this.changes,
          ),
          h("section", { class: "panel", style: "margin-top: 14px" }, h("h2", null, t("device.alerts")), this.alerts),
        ),
        h("section", { class: "panel live-panel" }, h("h2", null, t("device.charts")), this.controls, this.charts),
      ),
    );
    this.unsubscribe.push(
      store.readings.on((items) => this.onReadings(items)),
      store.devicesChanged.on((ids) => {
        if (ids.has(this.id)) this.onPresence();
      }),
      store.alertChanged.on((e) => {
        if (e.alert.device_id === this.id) void this.loadAlerts();
      }),
    );
    void this.load();
  }

  title(): string {
    return t("device.title", { id: this.id });
  }

  destroy(): void {
    for (const fn of this.unsubscribe) fn();
    for (const c of this.made) c.destroy();
  }

  private run(): string | null {
    return store.source === "replay" ? store.runId : null;
  }

  private async load(): Promise<void> {
    try {
      this.detail = await api<DeviceDetail>("GET", `/api/v1/devices/${encodeURIComponent(this.id)}`);
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 404) {
        replaceChildren(this.head, h("h1", null, t("device.notFound", { id: this.id })));
        return;
      }
      this.ctx.toast(t("action.failed", { message: exc instanceof Error ? exc.message : String(exc) }), "error");
      return;
    }
    this.renderHead();
    this.renderValues();
    this.renderControls();
    void this.renderCharts();
    void this.loadPresence();
    void this.loadAlerts();
  }

  private status(): "online" | "offline" | "stale" | "unknown" {
    const rec = store.devices.get(this.id);
    if (rec) return store.deviceStatus(rec);
    const d = this.detail;
    if (!d) return "unknown";
    if (d.presence === "offline") return "offline";
    if (d.stale_since) return "stale";
    return d.presence;
  }

  private renderHead(): void {
    const d = this.detail!;
    const status = this.status();
    this.lastPresence = status;
    const admin = this.ctx.can("admin");
    const service = admin
      ? h(
          "button",
          { type: "button", class: "btn btn-small", "data-action": d.out_of_service ? "return-to-service" : "out-of-service" },
          d.out_of_service ? t("device.returnToService") : t("device.putOutOfService"),
        )
      : null;
    service?.addEventListener("click", () => void this.toggleService());
    replaceChildren(
      this.head,
      h("h1", null, t("device.title", { id: d.id })),
      h("span", { class: `presence-tag p-${status}`, "data-presence": status }, tDynamic(`presence.${status}`, status)),
      d.out_of_service ? h("span", { class: "state-label state-out_of_service" }, t("device.outOfService")) : null,
      service,
    );
    const since = parseTime(d.presence_changed_at);
    replaceChildren(
      this.info,
      ...([
        [t("device.kind"), d.kind ?? "—"],
        [t("device.domain"), domainLabel(d.domain)],
        [t("device.district"), districtLabel(d.district)],
        [t("device.presence"), `${tDynamic(`presence.${status}`, status)}${since ? ` · ${t("device.presenceSince", { time: formatDateTime(since) })}` : ""}`],
        [t("device.lastSeen"), formatDateTime(parseTime(d.last_seen))],
        [t("device.position"), d.lat !== null && d.lon !== null ? `${d.lat.toFixed(5)}, ${d.lon.toFixed(5)}` : "—"],
      ] as [string, string][]).flatMap(([k, v]) => [h("dt", null, k), h("dd", null, v)]),
    );
  }

  private async toggleService(): Promise<void> {
    const d = this.detail;
    if (!d) return;
    const path = d.out_of_service ? "return-to-service" : "out-of-service";
    try {
      await api("POST", `/api/v1/devices/${encodeURIComponent(d.id)}/${path}`, { note: "" });
    } catch (exc) {
      this.ctx.toast(t("action.failed", { message: exc instanceof Error ? exc.message : String(exc) }), "error");
    }
    await this.load();
  }

  private renderValues(): void {
    const d = this.detail;
    if (!d) return;
    const rec = store.devices.get(this.id);
    const rows = d.series.map((s) => {
      const latest = rec?.series.get(s.channel);
      const ts = latest ? latest.ts : parseTime(s.ts);
      const value = latest ? (latest.state ?? latest.value) : (s.state ?? s.value);
      const shown = typeof value === "number" ? formatNumber(value, 3) : (value ?? "—");
      return h(
        "tr",
        { "data-channel": s.channel },
        h("td", null, s.channel),
        h("td", { class: "num" }, `${shown}${s.unit && typeof value === "number" ? ` ${s.unit}` : ""}`),
        h("td", { class: "num" }, formatDateTime(ts)),
      );
    });
    replaceChildren(
      this.values,
      h("thead", null, h("tr", null, h("th", { scope: "col" }, t("device.channel")), h("th", { scope: "col" }, t("device.value")), h("th", { scope: "col" }, t("device.time")))),
      h("tbody", null, ...rows),
    );
  }

  private onReadings(items: ReadingItem[]): void {
    let mine = false;
    for (const [device, channel, ts, v] of items) {
      if (device !== this.id) continue;
      mine = true;
      this.live.get(channel)?.push(ts, typeof v === "number" ? v : null);
    }
    if (mine) this.renderValues();
  }

  private onPresence(): void {
    const status = this.status();
    if (status !== this.lastPresence) {
      this.changes.prepend(
        h("li", null, h("span", { class: "tl-time" }, formatDateTime(Date.now() / 1000)), h("span", { class: `presence-tag p-${status}` }, tDynamic(`presence.${status}`, status))),
      );
      this.changes.querySelector(".empty")?.remove();
      if (this.detail) this.renderHead();
    }
  }

  private async loadPresence(): Promise<void> {
    if (!this.changes.children.length) this.changes.appendChild(h("li", { class: "empty" }, t("device.noPresenceChanges")));
    const d = this.detail;
    const channel = d?.series[0]?.channel;
    if (!d || !channel) return;
    const end = Date.now() / 1000;
    const start = Math.floor((end - 86400) / 900) * 900;
    try {
      const hist = await api<SeriesHistory>(
        "GET",
        `/api/v1/devices/${encodeURIComponent(d.id)}/series/${encodeURIComponent(channel)}/history${query({
          start: new Date(start * 1000).toISOString(),
          end: new Date(end * 1000).toISOString(),
          bucket: "15m",
          run: this.run(),
        })}`,
      );
      const counts = new Map<number, number>();
      for (const p of hist.points) {
        const ts = parseTime(p.ts);
        if (ts !== null) counts.set(Math.floor(ts / 900) * 900, p.readings ?? 1);
      }
      const expected = d.expected_period_s ? Math.max(1, Math.floor(900 / d.expected_period_s)) : 1;
      const firstSeen = parseTime(d.first_seen) ?? start;
      const cells: HTMLElement[] = [];
      for (let b = start; b < end; b += 900) {
        const n = counts.get(b) ?? 0;
        // Before the device was first seen there is nothing to miss.
        const cls = b + 900 <= firstSeen ? "before" : n === 0 ? "gap" : n < expected * 0.5 ? "partial" : "";
        cells.push(h("span", { class: cls, title: `${formatDateTime(b)} · ${n}` }));
      }
      const counted = cells.filter((c) => c.className !== "before");
      const gaps = counted.filter((c) => c.className === "gap").length;
      this.presence.setAttribute("aria-label", `${t("device.presenceHistory")}: ${counted.length - gaps}/${counted.length}`);
      replaceChildren(this.presence, ...cells);
    } catch {
      // no history (a device that never reported): the strip stays empty
    }
  }

  private async loadAlerts(): Promise<void> {
    const open = store.alertsOfDevice(this.id);
    let recent: Alert[] = [];
    try {
      const page = await api<{ items: Record<string, unknown>[] }>(
        "GET",
        `/api/v1/alerts${query({ text: this.id, limit: 20, source: store.source })}`,
      );
      recent = page.items.map(normalizeAlert).filter((a) => a.device_id === this.id || a.subject === this.id);
    } catch {
      // the open alerts from the live picture are still shown
    }
    const byId = new Map<string, Alert>();
    for (const a of [...open, ...recent]) if (!byId.has(a.id)) byId.set(a.id, a);
    const list = [...byId.values()].sort((a, b) => b.raised_at - a.raised_at);
    replaceChildren(
      this.alerts,
      ...(list.length
        ? list.map((a) =>
            h(
              "li",
              { "data-alert-id": a.id },
              severityBadge(a.severity),
              h("a", { href: href({ name: "alert", id: a.id }) }, a.message || a.rule_id),
              h("span", { class: "sub" }, `${stateLabel(a.state)} · ${formatDateTime(a.raised_at)}`),
            ),
          )
        : [h("li", null, t("device.noAlerts"))]),
    );
  }

  // -- charts -----------------------------------------------------------------------------

  private renderControls(): void {
    const tab = (mode: Mode, label: string) => {
      const b = h("button", { type: "button", role: "tab", class: "btn btn-small", "aria-selected": memory.mode === mode ? "true" : "false", "aria-controls": "device-charts", "data-mode": mode }, label);
      b.addEventListener("click", () => {
        memory.mode = mode;
        this.renderControls();
        void this.renderCharts();
      });
      return b;
    };
    const parts: HTMLElement[] = [tab("live", t("device.live")), tab("history", t("device.history"))];
    if (memory.mode === "history") {
      const range = h("div", { class: "range-form", role: "group", "aria-label": t("device.range") });
      for (const [key, seconds] of RANGES) {
        const b = h("button", { type: "button", class: "btn btn-small", "aria-pressed": memory.rangeS === seconds && memory.from === null ? "true" : "false", "data-range": key }, t(`range.${key}` as MessageKey));
        b.addEventListener("click", () => {
          memory.rangeS = seconds;
          memory.from = null;
          memory.to = null;
          this.renderControls();
          void this.renderCharts();
        });
        range.appendChild(b);
      }
      const now = Date.now() / 1000;
      // Text, not datetime-local: the browser would show its own locale's format;
      // the console writes ISO dates in the city's zone.
      const hint = `YYYY-MM-DD HH:mm (${getTimeZone()}, ${zoneOffsetLabel()})`;
      const from = h("input", { type: "text", id: "range-from", size: 16, inputmode: "numeric", placeholder: "YYYY-MM-DD HH:mm", title: hint, "aria-describedby": "range-hint", value: toLocalInput(memory.from ?? now - memory.rangeS).replace("T", " ") });
      const to = h("input", { type: "text", id: "range-to", size: 16, inputmode: "numeric", placeholder: "YYYY-MM-DD HH:mm", title: hint, "aria-describedby": "range-hint", value: toLocalInput(memory.to ?? now).replace("T", " ") });
      const apply = h("button", { type: "button", class: "btn btn-small", "data-range": "custom" }, t("device.apply"));
      apply.addEventListener("click", () => {
        const f = fromLocalInput(from.value.trim().replace(" ", "T"));
        const tt = fromLocalInput(to.value.trim().replace(" ", "T"));
        from.setAttribute("aria-invalid", f === null ? "true" : "false");
        to.setAttribute("aria-invalid", tt === null || (f !== null && tt <= f) ? "true" : "false");
        if (f !== null && tt !== null && tt > f) {
          memory.from = f;
          memory.to = tt;
          this.renderControls();
          void this.renderCharts();
        }
      });
      range.append(
        h("label", { for: "range-from" }, t("device.from")),
        from,
        h("label", { for: "range-to" }, t("device.to")),
        to,
        apply,
        h("span", { class: "chart-note", id: "range-hint" }, hint),
      );
      parts.push(range);
    }
    replaceChildren(this.controls, ...parts);
  }

  private async renderCharts(): Promise<void> {
    const d = this.detail;
    if (!d) return;
    const request = ++this.chartRequest;
    for (const c of this.made) c.destroy();
    this.made = [];
    this.live.clear();
    replaceChildren(this.charts);
    const now = Date.now() / 1000;
    const [start, end] = memory.mode === "live" ? [now - 15 * 60, now] : memory.from !== null && memory.to !== null ? [memory.from, memory.to] : [now - memory.rangeS, now];
    const rec = store.devices.get(d.id);
    const device = { id: d.id, kind: d.kind ?? rec?.kind ?? null, domain: d.domain, district: d.district };
    for (const s of d.series.slice(0, MAX_CHARTS)) {
      const box = h("div", { class: "chart-box", "data-channel": s.channel });
      this.charts.appendChild(box);
      let hist: SeriesHistory;
      try {
        hist = await api<SeriesHistory>(
          "GET",
          `/api/v1/devices/${encodeURIComponent(d.id)}/series/${encodeURIComponent(s.channel)}/history${query({
            start: new Date(start * 1000).toISOString(),
            end: new Date(end * 1000).toISOString(),
            bucket: memory.mode === "live" ? "raw" : null,
            run: this.run(),
          })}`,
        );
      } catch (exc) {
        box.append(h("h3", null, s.channel), h("p", { class: "chart-note" }, exc instanceof Error ? exc.message : String(exc)));
        continue;
      }
      if (request !== this.chartRequest) return;
      const head = h("h3", null, s.channel, h("span", { class: "unit" }, s.unit ?? ""), h("span", { class: "unit", "data-bucket": hist.bucket }, t("device.bucket", { bucket: hist.bucket })));
      if (hist.kind === "state") {
        box.append(head, stateList(hist));
        continue;
      }
      const band = hist.bucket !== "raw";
      const live = memory.mode === "live";
      const chart = new SeriesChart({
        label: s.channel,
        unit: s.unit,
        thresholds: thresholdsFor(device, s.channel),
        band,
        height: 200,
        // Live: the last 15 minutes, moving; history: the whole range asked for.
        xRange: live ? () => [Date.now() / 1000 - 15 * 60, Date.now() / 1000] : () => [start, end],
      });
      this.made.push(chart);
      const note = h("p", { class: "chart-note" });
      box.append(head, chart.el, note);
      const xs: number[] = [];
      const ys: (number | null)[] = [];
      const mins: (number | null)[] = [];
      const maxs: (number | null)[] = [];
      for (const p of hist.points) {
        const ts = parseTime(p.ts);
        if (ts === null) continue;
        xs.push(ts);
        ys.push(band ? p.avg : p.value);
        mins.push(p.min);
        maxs.push(p.max);
      }
      if (!xs.length) setText(note, t("device.noData"));
      if (memory.mode === "live") {
        const series = new LiveSeries(chart);
        series.seed(xs, ys);
        this.live.set(s.channel, series);
      } else {
        chart.setData(xs, ys, mins, maxs);
      }
    }
  }
}
