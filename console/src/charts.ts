// Charts of one series with uPlot (canvas): live (a moving 15-minute window)
// or history (raw points, or min–max bands with the average per bucket),
// with the rule thresholds that apply to the series drawn across, and
// optional event markers (an alert's raise, acknowledgement, clear…).

import uPlot from "uplot";
import { h } from "./dom";
import { formatDateTime, getTimeZone } from "./format";
import { t } from "./i18n";
import { SEVERITY_COLOR } from "./severity";
import { store } from "./store";
import type { RuleInfo, Severity } from "./types";

export interface Threshold {
  value: number;
  op: string;
  kind: "raise" | "clear";
  severity: Severity;
  rule: string;
}

export interface Marker {
  at: number;
  label: string;
  color: string;
}

const COMPARISON = /^\s*(value|(?:avg|min|max)\([^)]*\))\s*(>=|<=|==|>|<)\s*(-?\d+(?:\.\d+)?(?:e-?\d+)?)\s*$/i;

/** The numeric comparisons of a rule expression (`value >= 10 or avg(5m) > 3`). */
export function parseComparisons(expr: string): { term: string; op: string; value: number }[] {
  const out: { term: string; op: string; value: number }[] = [];
  for (const part of expr.split(/\s+(?:or|and)\s+/i)) {
    const m = COMPARISON.exec(part.replace(/^\(|\)$/g, ""));
    if (m) out.push({ term: m[1]!, op: m[2]!, value: Number(m[3]) });
  }
  return out;
}

function ruleApplies(rule: RuleInfo, device: { id: string; kind: string | null; domain: string; district: string }, channel: string): boolean {
  const s = rule.subject;
  if (s.channels.length && !s.channels.includes(channel)) return false;
  if (!s.channels.length) return false; // device- and correlation-level rules draw no line
  if (s.devices.length && !s.devices.includes(device.id)) return false;
  if (s.kinds.length && (!device.kind || !s.kinds.includes(device.kind))) return false;
  if (s.domains.length && !s.domains.includes(device.domain)) return false;
  if (s.districts.length && !s.districts.includes(device.district)) return false;
  return true;
}

/** Thresholds of the loaded rules that watch this device's channel. */
export function thresholdsFor(
  device: { id: string; kind: string | null; domain: string; district: string },
  channel: string,
): Threshold[] {
  const out: Threshold[] = [];
  for (const rule of store.rules.values()) {
    if (!ruleApplies(rule, device, channel)) continue;
    for (const c of parseComparisons(rule.when)) {
      if (c.term.toLowerCase() === "value" || /^(avg|min|max)/i.test(c.term))
        out.push({ value: c.value, op: c.op, kind: "raise", severity: rule.severity, rule: rule.name || rule.id });
    }
    for (const c of parseComparisons(rule.clear_when)) {
      out.push({ value: c.value, op: c.op, kind: "clear", severity: rule.severity, rule: rule.name || rule.id });
    }
  }
  return out;
}

const AXIS = {
  stroke: "#9fb0c2",
  grid: { stroke: "#2a3644", width: 1 },
  ticks: { stroke: "#2a3644", width: 1 },
};

/** Axis labels in the city's zone: `HH:mm` (or `HH:mm:ss`), `MM-DD` for whole days. */
function axisTime(epochS: number, incr: number): string {
  const full = formatDateTime(epochS); // 2024-05-01 13:45:07
  if (incr >= 86_400) return full.slice(5, 10);
  if (incr < 60) return full.slice(11, 19);
  return full.slice(11, 16);
}

function tzDate(ts: number): Date {
  return uPlot.tzDate(new Date(ts * 1e3), getTimeZone());
}

export interface ChartOptions {
  label: string;
  unit: string | null;
  thresholds: Threshold[];
  markers?: Marker[];
  height?: number;
  /** Bucketed history: a min–max band around the average. */
  band?: boolean;
  /** The time axis: the range asked for (gaps show), or a moving window. */
  xRange?: () => [number, number];
}

export class SeriesChart {
  readonly el: HTMLElement;
  private plot: uPlot | null = null;
  private readonly box: HTMLElement;
  private readonly resize: ResizeObserver;
  private data: uPlot.AlignedData = [[], []];
  private markers: Marker[];

  constructor(private readonly options: ChartOptions) {
    this.markers = options.markers ?? [];
    this.box = h("div", { class: "chart", role: "img", "aria-label": this.describe() });
    this.el = this.box;
    this.resize = new ResizeObserver(() => this.fit());
    this.resize.observe(this.box);
  }

  destroy(): void {
    this.resize.disconnect();
    this.plot?.destroy();
    this.plot = null;
  }

  setMarkers(markers: Marker[]): void {
    this.markers = markers;
    this.plot?.redraw(false, false);
  }

  /** Replace the data: times (epoch s) and values; with `band`, also min and max. */
  setData(xs: number[], ys: (number | null)[], min?: (number | null)[], max?: (number | null)[]): void {
    this.data = this.options.band && min && max ? [xs, ys, min, max] : [xs, ys];
    this.box.dataset["points"] = String(xs.length);
    if (!this.plot) this.create();
    else this.plot.setData(this.data);
  }

  private describe(): string {
    const thr = this.options.thresholds
      .map((x) => t("chart.threshold", { label: x.kind === "raise" ? t("chart.raise") : t("chart.clear"), op: x.op === "==" ? "=" : x.op, value: x.value }))
      .join(", ");
    return `${this.options.label}${this.options.unit ? ` (${this.options.unit})` : ""}${thr ? `: ${thr}` : ""}`;
  }

  private fit(): void {
    const width = Math.max(200, Math.floor(this.box.clientWidth));
    if (!this.plot) {
      if (this.data[0].length || this.box.isConnected) this.create();
      return;
    }
    if (Math.abs(this.plot.width - width) > 2) this.plot.setSize({ width, height: this.options.height ?? 240 });
  }

  private create(): void {
    if (this.plot || !this.box.isConnected) return;
    const width = Math.max(200, Math.floor(this.box.clientWidth || 600));
    const thresholds = this.options.thresholds;
    const markers = () => this.markers;
    const series: uPlot.Series[] = [
      {},
      {
        label: this.options.band ? t("chart.avg") : this.options.label,
        stroke: "#5aa9ff",
        width: 1.6,
        spanGaps: false,
        points: { show: false },
      },
    ];
    const bands: uPlot.Band[] = [];
    if (this.options.band) {
      series.push(
        { label: "min", stroke: "#5aa9ff55", width: 1, points: { show: false } },
        { label: "max", stroke: "#5aa9ff55", width: 1, points: { show: false } },
      );
      bands.push({ series: [3, 2], fill: "#5aa9ff33" });
    }
    const opts: uPlot.Options = {
      width,
      height: this.options.height ?? 240,
      tzDate,
      series,
      bands,
      legend: { show: true, live: true },
      cursor: { drag: { x: true, y: false } },
      scales: {
        x: this.options.xRange ? { time: true, range: () => this.options.xRange!() } : { time: true },
        y: {
          range: (_u, min, max) => {
            let lo = Number.isFinite(min) ? min : 0;
            let hi = Number.isFinite(max) ? max : 1;
            for (const th of thresholds) {
              lo = Math.min(lo, th.value);
              hi = Math.max(hi, th.value);
            }
            const pad = (hi - lo || Math.abs(hi) || 1) * 0.08;
            return [lo - pad, hi + pad];
          },
        },
      },
      axes: [
        { ...AXIS, space: 70, values: (_u: uPlot, splits: number[], _i: number, _space: number, incr: number) => splits.map((v) => axisTime(v, incr)) },
        { ...AXIS, size: 60 },
      ],
      hooks: {
        draw: [
          (u: uPlot) => {
            const ctx = u.ctx;
            const { left, top, width: w, height: hgt } = u.bbox;
            ctx.save();
            ctx.font = `${Math.round(11 * devicePixelRatio)}px system-ui, 'IPAPGothic', sans-serif`;
            for (const th of thresholds) {
              const y = u.valToPos(th.value, "y", true);
              if (y < top || y > top + hgt) continue;
              ctx.strokeStyle = th.kind === "raise" ? SEVERITY_COLOR[th.severity] : "#3ecf8e";
              ctx.lineWidth = 1.5 * devicePixelRatio;
              ctx.setLineDash(th.kind === "raise" ? [] : [6 * devicePixelRatio, 4 * devicePixelRatio]);
              ctx.beginPath();
              ctx.moveTo(left, y);
              ctx.lineTo(left + w, y);
              ctx.stroke();
              ctx.fillStyle = ctx.strokeStyle;
              ctx.textAlign = "right";
              ctx.fillText(
                `${th.kind === "raise" ? t("chart.raise") : t("chart.clear")} ${th.op === "==" ? "=" : th.op} ${th.value}`,
                left + w - 4 * devicePixelRatio,
                y - 3 * devicePixelRatio,
              );
            }
            ctx.setLineDash([]);
            for (const m of markers()) {
              if (!Number.isFinite(m.at)) continue;
              const x = u.valToPos(m.at, "x", true);
              if (x < left || x > left + w) continue;
              ctx.strokeStyle = m.color;
              ctx.lineWidth = 1.5 * devicePixelRatio;
              ctx.beginPath();
              ctx.moveTo(x, top);
              ctx.lineTo(x, top + hgt);
              ctx.stroke();
              ctx.fillStyle = m.color;
              // At the foot of the line: the thresholds' labels sit at the right end, higher up.
              ctx.textAlign = x > left + w * 0.85 ? "right" : "left";
              ctx.fillText(m.label, x + (ctx.textAlign === "right" ? -3 : 3) * devicePixelRatio, top + hgt - 4 * devicePixelRatio);
            }
            ctx.restore();
          },
        ],
      },
    };
    this.plot = new uPlot(opts, this.data, this.box);
  }
}

/** A live chart: the last `windowS` seconds of one series, fed point by point. */
export class LiveSeries {
  private xs: number[] = [];
  private ys: (number | null)[] = [];
  private pending = false;

  constructor(
    readonly chart: SeriesChart,
    private readonly windowS = 15 * 60,
  ) {}

  seed(xs: number[], ys: (number | null)[]): void {
    this.xs = xs.slice();
    this.ys = ys.slice();
    this.flush();
  }

  push(ts: number, value: number | null): void {
    const n = this.xs.length;
    if (n && ts <= this.xs[n - 1]!) {
      if (ts === this.xs[n - 1]) this.ys[n - 1] = value;
      else return; // late: the chart already moved on
    } else {
      this.xs.push(ts);
      this.ys.push(value);
    }
    if (this.pending) return;
    this.pending = true;
    // At most one redraw per second, however fast the series reports.
    window.setTimeout(() => this.flush(), 1000);
  }

  private flush(): void {
    this.pending = false;
    const cutoff = Date.now() / 1000 - this.windowS;
    let drop = 0;
    while (drop < this.xs.length && this.xs[drop]! < cutoff) drop++;
    if (drop) {
      this.xs.splice(0, drop);
      this.ys.splice(0, drop);
    }
    this.chart.setData(this.xs, this.ys);
  }
}
