// The city map: one canvas, Web Mercator (so an optional raster basemap lines
// up), districts from the city model, devices as markers coloured by their
// worst open alert and by presence, grid-clustered when zoomed out.
//
// Why a canvas: 10,000 devices as DOM elements cost a style and layout pass
// for each on every pan and every state change; on a canvas a frame is one
// loop over typed arrays (projection, clustering) plus a few hundred draw
// calls, whatever the number of devices. The map redraws at most once per
// animation frame and only when something drawn changed: a reading changes
// no pixel, an alert or presence change does. `bench/console.py` compares it
// with the DOM renderer below (one element per device).

import { h, replaceChildren, setAttr } from "../dom";
import { formatDateTime, formatNumber } from "../format";
import { t, tDynamic } from "../i18n";
import { href } from "../router";
import { PRESENCE_COLOR, SEVERITY_COLOR, severityIcon, severityLabel, shapePath } from "../severity";
import { settings } from "../settings";
import type { DeviceRec } from "../store";
import { store } from "../store";
import type { Severity } from "../types";
import { SEVERITIES } from "../types";

const TILE = 256;
const CELL_PX = 56;
const MIN_ZOOM = 10;
const MAX_ZOOM = 19.5;
const UNCLUSTER_ZOOM = 17;
const NO_ALERT: number = SEVERITIES.length;

/** Status codes drawn: 0 online, 1 offline, 2 stale, 3 unknown. */
type Status = 0 | 1 | 2 | 3;
const STATUS_NAMES = ["online", "offline", "stale", "unknown"] as const;

export interface MapOverride {
  /** Worst alert rank per device at the scrubbed time (absent: none). */
  worst: Map<string, number>;
  /** Presence per device at that time (absent: unknown). */
  status: Map<string, Status>;
}

interface Drawn {
  x: number;
  y: number;
  r: number;
  /** Device index for a marker, -1 for a cluster. */
  device: number;
  /** Devices drawn here, and the worst alert rank among them. */
  count: number;
  worst: number;
}

interface ViewState {
  cx: number;
  cy: number;
  z: number;
}

/** The last view (kept across page visits and language switches). */
let savedView: ViewState | null = null;

export function mercX(lon: number): number {
  return (lon + 180) / 360;
}

export function mercY(lat: number): number {
  const phi = (Math.max(-85, Math.min(85, lat)) * Math.PI) / 180;
  return (1 - Math.log(Math.tan(phi) + 1 / Math.cos(phi)) / Math.PI) / 2;
}

export class CityMap {
  readonly el: HTMLElement;
  private readonly canvas: HTMLCanvasElement;
  private readonly ctx: CanvasRenderingContext2D;
  private readonly tooltip: HTMLElement;
  private readonly popup: HTMLElement;
  private readonly dom: HTMLElement | null;
  private width = 0;
  private height = 0;
  private dpr = 1;
  private view: ViewState = { cx: 0.5, cy: 0.5, z: 13 };
  private fitted = false;
  private mx = new Float64Array(0);
  private my = new Float64Array(0);
  private positioned = 0;
  private projectedCount = -1;
  private districts: { name: string; label: string; pts: [number, number][]; c: [number, number] }[] = [];
  private roads: [number, number][][] = [];
  private drawn: Drawn[] = [];
  private frame: number | null = null;
  private dirty = true;
  private selected: number = -1;
  private override: MapOverride | null = null;
  private readonly tiles = new Map<string, HTMLImageElement>();
  private readonly resize: ResizeObserver;
  private readonly unsubscribe: (() => void)[] = [];
  private domMarkers: HTMLElement[] = [];
  private background: { canvas: HTMLCanvasElement; z: number; dpr: number; x0: number; y0: number; w: number; h: number } | null = null;
  private sxBuf = new Float32Array(0);
  private syBuf = new Float32Array(0);
  private next = new Int32Array(0);
  private cN = new Int32Array(0);
  private cSt = new Int32Array(0);
  private cWorst = new Uint8Array(0);
  private cSx = new Float64Array(0);
  private cSy = new Float64Array(0);
  private cHead = new Int32Array(0);
  /** Renders done and the time of the last one (read by the benchmark). */
  stats = { renders: 0, lastMs: 0, totalMs: 0, firstCompleteAt: 0 };

  constructor(private readonly onOpenDevice: (id: string) => void) {
    this.canvas = h("canvas", {
      class: "map-canvas",
      tabindex: 0,
      role: "img",
      "aria-roledescription": "map",
      "aria-describedby": "map-help",
    });
    const ctx = this.canvas.getContext("2d", { alpha: false });
    if (!ctx) throw new Error("no 2D canvas");
    this.ctx = ctx;
    this.tooltip = h("div", { class: "map-tooltip", hidden: true, role: "presentation" });
    this.popup = h("div", { class: "map-popup", hidden: true, role: "dialog", "aria-label": t("map.openDevice") });
    this.dom = settings.mapRenderer === "dom" ? h("div", { class: "map-dom", "aria-hidden": "true" }) : null;
    const zoomIn = h("button", { type: "button", class: "btn btn-small", "aria-label": t("map.zoomIn"), title: t("map.zoomIn") }, "+");
    const zoomOut = h("button", { type: "button", class: "btn btn-small", "aria-label": t("map.zoomOut"), title: t("map.zoomOut") }, "−");
    const fit = h("button", { type: "button", class: "btn btn-small btn-fit" }, t("map.fit"));
    zoomIn.addEventListener("click", () => this.zoomAt(1, this.width / 2, this.height / 2));
    zoomOut.addEventListener("click", () => this.zoomAt(-1, this.width / 2, this.height / 2));
    fit.addEventListener("click", () => this.fit());
    this.el = h(
      "div",
      { class: "map-panel live-panel", "data-renderer": settings.mapRenderer },
      this.canvas,
      this.dom,
      h("div", { class: "map-watermark", "aria-hidden": "true" }, t("replay.bannerShort")),
      h("div", { class: "map-tools" }, zoomIn, zoomOut, fit),
      this.legend(),
      h("p", { class: "map-help", id: "map-help" }, t("map.help")),
      this.tooltip,
      this.popup,
    );
    if (savedView) {
      this.view = { ...savedView };
      this.fitted = true;
    }
    this.resize = new ResizeObserver(() => this.onResize());
    this.resize.observe(this.el);
    this.bindInput();
    this.loadCity();
    this.unsubscribe.push(
      store.reset.on(() => {
        this.projectedCount = -1;
        this.request();
      }),
      store.devicesChanged.on((ids) => {
        if (store.deviceList.length !== this.projectedCount) this.projectedCount = -1;
        this.request();
        if (this.dom) this.updateDomClasses(ids);
      }),
      store.alertChanged.on(() => this.request()),
    );
    if (this.dom) this.unsubscribe.push(store.readings.on((items) => this.updateDomTitles(items)));
  }

  destroy(): void {
    savedView = { ...this.view };
    this.resize.disconnect();
    for (const fn of this.unsubscribe) fn();
    if (this.frame !== null) cancelAnimationFrame(this.frame);
  }

  /** Draw the city as it was (time slider), or live again with null. */
  setOverride(override: MapOverride | null): void {
    this.override = override;
    this.request();
  }

  request(): void {
    this.dirty = true;
    if (this.frame !== null) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = null;
      if (this.dirty) this.render();
    });
  }

  // -- geometry ------------------------------------------------------------------------

  private loadCity(): void {
    const city = store.city;
    if (!city) return;
    this.districts = city.districts.map((d) => {
      const pts = d.polygon.map(([lat, lon]): [number, number] => [mercX(lon), mercY(lat)]);
      const c: [number, number] = [
        pts.reduce((s, p) => s + p[0], 0) / pts.length,
        pts.reduce((s, p) => s + p[1], 0) / pts.length,
      ];
      return { name: d.name, label: d.label, pts, c };
    });
    this.roads = city.roads.map((r) => r.points.map(([lat, lon]): [number, number] => [mercX(lon), mercY(lat)]));
  }

  private project(): void {
    const list = store.deviceList;
    this.mx = new Float64Array(list.length);
    this.my = new Float64Array(list.length);
    let positioned = 0;
    for (const rec of list) {
      if (rec.lat === null || rec.lon === null) {
        this.mx[rec.index] = Number.NaN;
        continue;
      }
      this.mx[rec.index] = mercX(rec.lon);
      this.my[rec.index] = mercY(rec.lat);
      positioned++;
    }
    this.positioned = positioned;
    this.projectedCount = list.length;
    if (this.dom) this.buildDom();
  }

  private scale(): number {
    return TILE * 2 ** this.view.z;
  }

  private toScreen(mx: number, my: number): [number, number] {
    const s = this.scale();
    return [(mx - this.view.cx) * s + this.width / 2, (my - this.view.cy) * s + this.height / 2];
  }

  private fit(): void {
    let minX = Infinity;
    let minY = Infinity;
    let maxX = -Infinity;
    let maxY = -Infinity;
    const take = (x: number, y: number) => {
      if (!Number.isFinite(x)) return;
      minX = Math.min(minX, x);
      maxX = Math.max(maxX, x);
      minY = Math.min(minY, y);
      maxY = Math.max(maxY, y);
    };
    const b = store.city?.bounds;
    if (b) {
      take(mercX(b.west), mercY(b.north));
      take(mercX(b.east), mercY(b.south));
    } else {
      for (let i = 0; i < this.mx.length; i++) take(this.mx[i]!, this.my[i]!);
    }
    if (!Number.isFinite(minX) || this.width === 0) return;
    const spanX = Math.max(maxX - minX, 1e-7);
    const spanY = Math.max(maxY - minY, 1e-7);
    const pad = 40;
    const s = Math.min((this.width - pad * 2) / spanX, (this.height - pad * 2) / spanY);
    this.view = {
      cx: (minX + maxX) / 2,
      cy: (minY + maxY) / 2,
      z: Math.max(MIN_ZOOM, Math.min(MAX_ZOOM, Math.log2(s / TILE))),
    };
    this.fitted = true;
    this.request();
  }

  private zoomAt(delta: number, sx: number, sy: number): void {
    const before = this.scale();
    const z = Math.max(MIN_ZOOM, Math.min(MAX_ZOOM, this.view.z + delta));
    if (z === this.view.z) return;
    // Keep the world point under the cursor where it is.
    const wx = this.view.cx + (sx - this.width / 2) / before;
    const wy = this.view.cy + (sy - this.height / 2) / before;
    this.view.z = z;
    const after = this.scale();
    this.view.cx = wx - (sx - this.width / 2) / after;
    this.view.cy = wy - (sy - this.height / 2) / after;
    this.hidePopup();
    this.request();
  }

  private panBy(dx: number, dy: number): void {
    const s = this.scale();
    this.view.cx -= dx / s;
    this.view.cy -= dy / s;
    this.request();
  }

  private onResize(): void {
    const rect = this.el.getBoundingClientRect();
    this.width = Math.max(1, Math.round(rect.width));
    this.height = Math.max(1, Math.round(rect.height));
    this.dpr = Math.min(2, window.devicePixelRatio || 1);
    this.canvas.width = Math.round(this.width * this.dpr);
    this.canvas.height = Math.round(this.height * this.dpr);
    this.canvas.style.width = `${this.width}px`;
    this.canvas.style.height = `${this.height}px`;
    if (!this.fitted) this.fit();
    this.dirty = true;
    this.render();
  }

  // -- state per device -----------------------------------------------------------------

  private worstOf(rec: DeviceRec): number {
    if (this.override) return this.override.worst.get(rec.id) ?? NO_ALERT;
    return rec.worst;
  }

  private statusOf(rec: DeviceRec): Status {
    if (this.override) return this.override.status.get(rec.id) ?? 3;
    if (rec.presence === "offline") return 1;
    if (rec.staleSince !== null) return 2;
    return rec.presence === "online" ? 0 : 3;
  }

  // -- drawing ---------------------------------------------------------------------------

  private render(): void {
    this.dirty = false;
    if (this.width === 0) return;
    const started = performance.now();
    if (this.projectedCount !== store.deviceList.length) {
      this.project();
      if (!this.fitted) this.fit();
    }
    const ctx = this.ctx;
    ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    ctx.fillStyle = "#0b1016";
    ctx.fillRect(0, 0, this.width, this.height);
    this.drawBasemap();
    this.drawDistricts();
    if (this.dom) this.positionDom();
    else this.drawDevices();
    this.stats.renders++;
    this.stats.lastMs = performance.now() - started;
    this.stats.totalMs += this.stats.lastMs;
    this.el.dataset["renderMs"] = this.stats.totalMs.toFixed(1);
    if (!this.stats.firstCompleteAt && store.snapshotAt && this.positioned > 0) {
      this.stats.firstCompleteAt = performance.now();
      performance.mark("cityops:map-complete");
      // The next frame's callback runs once this frame (with the DOM renderer:
      // its style, layout and paint of every marker) has been produced.
      requestAnimationFrame(() => performance.mark("cityops:map-painted"));
      this.el.dataset["complete"] = "1";
    }
    this.el.dataset["devices"] = String(this.positioned);
    this.el.dataset["view"] = `${this.view.cx},${this.view.cy},${this.view.z}`;
    this.el.dataset["clustered"] = this.view.z < UNCLUSTER_ZOOM ? "1" : "0";
    this.el.dataset["renders"] = String(this.stats.renders);
    this.updateLabel();
  }

  private drawBasemap(): void {
    const template = settings.basemapUrl.trim();
    if (!template) return;
    const iz = Math.max(0, Math.min(19, Math.round(this.view.z)));
    const n = 2 ** iz;
    const size = TILE * 2 ** (this.view.z - iz);
    const [ox, oy] = this.toScreen(0, 0);
    const x0 = Math.max(0, Math.floor(-ox / size));
    const y0 = Math.max(0, Math.floor(-oy / size));
    const x1 = Math.min(n - 1, Math.floor((this.width - ox) / size));
    const y1 = Math.min(n - 1, Math.floor((this.height - oy) / size));
    if ((x1 - x0 + 1) * (y1 - y0 + 1) > 64) return;
    this.ctx.globalAlpha = 0.55;
    for (let x = x0; x <= x1; x++) {
      for (let y = y0; y <= y1; y++) {
        const url = template.replace("{z}", String(iz)).replace("{x}", String(x)).replace("{y}", String(y));
        let img = this.tiles.get(url);
        if (!img) {
          img = new Image();
          img.onload = () => this.request();
          img.src = url;
          this.tiles.set(url, img);
          if (this.tiles.size > 256) this.tiles.delete(this.tiles.keys().next().value as string);
        }
        if (img.complete && img.naturalWidth > 0) this.ctx.drawImage(img, ox + x * size, oy + y * size, size, size);
      }
    }
    this.ctx.globalAlpha = 1;
  }

  /**
   * Districts, roads and labels change only with the zoom: they are drawn
   * once per zoom level into an offscreen canvas (in world pixels) and
   * blitted while the map pans. Very deep zooms draw them directly.
   */
  private drawDistricts(): void {
    if (!this.districts.length && !this.roads.length) return;
    const s = this.scale();
    let minX = Infinity;
    let minY = Infinity;
    let maxX = -Infinity;
    let maxY = -Infinity;
    for (const d of this.districts) {
      for (const [x, y] of d.pts) {
        minX = Math.min(minX, x);
        maxX = Math.max(maxX, x);
        minY = Math.min(minY, y);
        maxY = Math.max(maxY, y);
      }
    }
    const pad = 40;
    const wPx = (maxX - minX) * s + pad * 2;
    const hPx = (maxY - minY) * s + pad * 2;
    if (!Number.isFinite(wPx) || wPx * this.dpr > 4096 || hPx * this.dpr > 4096) {
      this.paintDistricts(this.ctx, (x, y) => this.toScreen(x, y));
      return;
    }
    const bg = this.background;
    if (!bg || bg.z !== this.view.z || bg.dpr !== this.dpr) {
      const canvas = bg?.canvas ?? document.createElement("canvas");
      canvas.width = Math.ceil(wPx * this.dpr);
      canvas.height = Math.ceil(hPx * this.dpr);
      const g = canvas.getContext("2d");
      if (!g) return;
      g.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
      g.clearRect(0, 0, wPx, hPx);
      const x0 = minX * s - pad;
      const y0 = minY * s - pad;
      this.paintDistricts(g, (x, y) => [x * s - x0, y * s - y0]);
      this.background = { canvas, z: this.view.z, dpr: this.dpr, x0, y0, w: wPx, h: hPx };
    }
    const b = this.background!;
    const left = b.x0 - this.view.cx * s + this.width / 2;
    const top = b.y0 - this.view.cy * s + this.height / 2;
    this.ctx.drawImage(b.canvas, left, top, b.w, b.h);
  }

  private paintDistricts(ctx: CanvasRenderingContext2D, at: (x: number, y: number) => [number, number]): void {
    const fills = ["#16324a", "#1a3a2f", "#2c2a48", "#3a2f1c", "#1d3440", "#2f2236"];
    ctx.lineWidth = 1.2;
    this.districts.forEach((d, i) => {
      ctx.beginPath();
      d.pts.forEach(([x, y], j) => {
        const [sx, sy] = at(x, y);
        if (j === 0) ctx.moveTo(sx, sy);
        else ctx.lineTo(sx, sy);
      });
      ctx.closePath();
      ctx.fillStyle = fills[i % fills.length]!;
      ctx.globalAlpha = 0.75;
      ctx.fill();
      ctx.globalAlpha = 1;
      ctx.strokeStyle = "#4b6580";
      ctx.stroke();
    });
    if (this.roads.length) {
      ctx.strokeStyle = "#3c4b5c";
      ctx.lineWidth = 2;
      for (const road of this.roads) {
        ctx.beginPath();
        road.forEach(([x, y], j) => {
          const [sx, sy] = at(x, y);
          if (j === 0) ctx.moveTo(sx, sy);
          else ctx.lineTo(sx, sy);
        });
        ctx.stroke();
      }
    }
    ctx.font = "600 12px system-ui, 'IPAPGothic', 'DejaVu Sans', sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillStyle = "#9fb0c2cc";
    for (const d of this.districts) {
      const [sx, sy] = at(d.c[0], d.c[1]);
      ctx.fillText(d.label, sx, sy - 18);
    }
  }

  /** Per-frame scratch space, grown with the device count (no garbage per frame). */
  private ensureBuffers(n: number): void {
    if (this.sxBuf.length >= n) return;
    const size = Math.max(n, 1024);
    this.sxBuf = new Float32Array(size);
    this.syBuf = new Float32Array(size);
    this.next = new Int32Array(size);
    this.cN = new Int32Array(size);
    this.cSt = new Int32Array(size * 4);
    this.cWorst = new Uint8Array(size);
    this.cSx = new Float64Array(size);
    this.cSy = new Float64Array(size);
    this.cHead = new Int32Array(size);
  }

  private drawDevices(): void {
    const list = store.deviceList;
    const n = list.length;
    this.ensureBuffers(n);
    const { sxBuf, syBuf, next, cN, cSt, cWorst, cSx, cSy, cHead } = this;
    const w = this.width;
    const hgt = this.height;
    const s = this.scale();
    const ox = w / 2 - this.view.cx * s;
    const oy = hgt / 2 - this.view.cy * s;
    const margin = CELL_PX;
    const cluster = this.view.z < UNCLUSTER_ZOOM;
    // One pass: project, cull, and either bucket the device by severity
    // (unclustered) or add it to its grid cell (a linked list of members).
    const singles: number[][] = [[], [], [], [], []];
    const cellOfKey = new Map<number, number>();
    let cells = 0;
    for (let i = 0; i < n; i++) {
      const mx = this.mx[i]!;
      if (mx !== mx) continue; // NaN: no position
      const x = mx * s + ox;
      const y = this.my[i]! * s + oy;
      if (x < -margin || y < -margin || x > w + margin || y > hgt + margin) continue;
      sxBuf[i] = x;
      syBuf[i] = y;
      const rec = list[i]!;
      const worst = this.worstOf(rec);
      if (!cluster) {
        singles[worst]!.push(i);
        continue;
      }
      const key = ((x / CELL_PX) | 0) * 65536 + ((y / CELL_PX + 1024) | 0);
      let c = cellOfKey.get(key);
      if (c === undefined) {
        c = cells++;
        cellOfKey.set(key, c);
        cN[c] = 0;
        cSt[c * 4] = cSt[c * 4 + 1] = cSt[c * 4 + 2] = cSt[c * 4 + 3] = 0;
        cWorst[c] = NO_ALERT;
        cSx[c] = cSy[c] = 0;
        cHead[c] = -1;
      }
      cN[c] = cN[c]! + 1;
      const k = c * 4 + this.statusOf(rec);
      cSt[k] = cSt[k]! + 1;
      if (worst < cWorst[c]!) cWorst[c] = worst;
      cSx[c] = cSx[c]! + x;
      cSy[c] = cSy[c]! + y;
      next[i] = cHead[c]!;
      cHead[c] = i;
    }
    const clustersBy: number[][] = [[], [], [], [], []];
    for (let c = 0; c < cells; c++) {
      if (cN[c] === 1) {
        const i = cHead[c]!;
        singles[this.worstOf(list[i]!)]!.push(i);
      } else clustersBy[cWorst[c]!]!.push(c);
    }
    const drawn: Drawn[] = [];
    const st: [number, number, number, number] = [0, 0, 0, 0];
    // Quiet first, the most severe last (drawn over the rest).
    for (let worst = NO_ALERT; worst >= 0; worst--) {
      for (const c of clustersBy[worst]!) {
        const count = cN[c]!;
        const x = cSx[c]! / count;
        const y = cSy[c]! / count;
        const r = Math.min(24, 10 + 4.5 * Math.log10(count));
        for (let k = 0; k < 4; k++) st[k] = cSt[c * 4 + k]!;
        this.drawCluster(x, y, r, count, st, worst);
        drawn.push({ x, y, r, device: -1, count, worst });
      }
    }
    for (let worst = NO_ALERT; worst >= 0; worst--) {
      for (const i of singles[worst]!) {
        const rec = list[i]!;
        const x = sxBuf[i]!;
        const y = syBuf[i]!;
        const r = this.drawMarker(x, y, this.statusOf(rec), worst, i === this.selected);
        drawn.push({ x, y, r: Math.max(r, 6), device: i, count: 1, worst });
      }
    }
    this.ctx.globalAlpha = 1;
    this.drawn = drawn;
  }

  private drawCluster(x: number, y: number, r: number, n: number, st: [number, number, number, number], worst: number): void {
    const ctx = this.ctx;
    // Presence ring: online, offline, stale, unknown shares.
    const colors = [PRESENCE_COLOR.online, PRESENCE_COLOR.offline, PRESENCE_COLOR.stale, PRESENCE_COLOR.unknown];
    let start = -Math.PI / 2;
    ctx.lineWidth = 4;
    for (let k = 0; k < 4; k++) {
      if (!st[k]) continue;
      const end = start + (st[k]! / n) * Math.PI * 2;
      ctx.beginPath();
      ctx.arc(x, y, r, start, end);
      ctx.strokeStyle = colors[k]!;
      ctx.stroke();
      start = end;
    }
    ctx.beginPath();
    ctx.arc(x, y, r - 3, 0, Math.PI * 2);
    const sev = SEVERITIES[worst];
    ctx.fillStyle = sev ? SEVERITY_COLOR[sev] : "#1f2b3a";
    ctx.fill();
    ctx.fillStyle = sev && sev !== "warning" ? "#111" : "#e6edf3";
    ctx.font = "700 12px system-ui, 'DejaVu Sans', sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(String(n), x, y + 0.5);
    if (sev) {
      // The severity's shape on the cluster's shoulder: readable without colour.
      shapePath(ctx, sev, x + r * 0.78, y - r * 0.78, 6.5);
      ctx.fillStyle = SEVERITY_COLOR[sev];
      ctx.fill();
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = "#0b1016";
      ctx.stroke();
    }
  }

  private drawMarker(x: number, y: number, status: Status, worst: number, selected: boolean): number {
    const ctx = this.ctx;
    const sev = SEVERITIES[worst];
    let r: number;
    if (sev) {
      r = sev === "critical" ? 9 : 8;
      shapePath(ctx, sev, x, y, r);
      ctx.fillStyle = SEVERITY_COLOR[sev];
      ctx.fill();
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = "#0b1016";
      ctx.stroke();
      if (status === 1) this.cross(x, y, r * 0.55, "#0b1016");
    } else if (status === 0) {
      r = 4.5;
      ctx.beginPath();
      ctx.arc(x, y, r, 0, Math.PI * 2);
      ctx.fillStyle = PRESENCE_COLOR.online;
      ctx.fill();
    } else if (status === 1) {
      r = 5;
      ctx.beginPath();
      ctx.arc(x, y, r, 0, Math.PI * 2);
      ctx.fillStyle = "#0b1016";
      ctx.fill();
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = PRESENCE_COLOR.offline;
      ctx.stroke();
      this.cross(x, y, 3, PRESENCE_COLOR.offline);
    } else if (status === 2) {
      r = 5;
      ctx.beginPath();
      ctx.setLineDash([2, 2]);
      ctx.arc(x, y, r, 0, Math.PI * 2);
      ctx.lineWidth = 2;
      ctx.strokeStyle = PRESENCE_COLOR.stale;
      ctx.stroke();
      ctx.setLineDash([]);
    } else {
      r = 3;
      ctx.beginPath();
      ctx.arc(x, y, r, 0, Math.PI * 2);
      ctx.fillStyle = PRESENCE_COLOR.unknown;
      ctx.fill();
    }
    if (selected) {
      ctx.beginPath();
      ctx.arc(x, y, r + 5, 0, Math.PI * 2);
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#ffffff";
      ctx.stroke();
    }
    return r;
  }

  private cross(x: number, y: number, d: number, color: string): void {
    const ctx = this.ctx;
    ctx.beginPath();
    ctx.moveTo(x - d, y - d);
    ctx.lineTo(x + d, y + d);
    ctx.moveTo(x + d, y - d);
    ctx.lineTo(x - d, y + d);
    ctx.lineWidth = 1.5;
    ctx.strokeStyle = color;
    ctx.stroke();
  }

  private updateLabel(): void {
    let alerts = 0;
    let offline = 0;
    for (const rec of store.deviceList) {
      if (this.worstOf(rec) < NO_ALERT) alerts++;
      if (this.statusOf(rec) === 1) offline++;
    }
    const label = `${t("overview.map", { city: store.city?.label ?? "" })}. ${t("overview.mapSummary", {
      devices: this.positioned,
      alerts,
      offline,
    })}`;
    setAttr(this.canvas, "aria-label", label);
  }

  private legend(): HTMLElement {
    const swatch = (draw: (ctx: CanvasRenderingContext2D) => void) => {
      const c = h("canvas", { class: "legend-swatch", width: 28, height: 28, "aria-hidden": "true" });
      const g = c.getContext("2d");
      if (g) {
        g.scale(2, 2);
        draw(g);
      }
      return c;
    };
    const sevItems = SEVERITIES.map((sev: Severity) =>
      h("li", null, severityIcon(sev, 14), severityLabel(sev)),
    );
    const dot = (fill: string | null, stroke: string | null, dashed = false, cross = false) =>
      swatch((g) => {
        g.beginPath();
        g.arc(7, 7, 4.5, 0, Math.PI * 2);
        if (fill) {
          g.fillStyle = fill;
          g.fill();
        }
        if (stroke) {
          if (dashed) g.setLineDash([2, 2]);
          g.lineWidth = 1.5;
          g.strokeStyle = stroke;
          g.stroke();
        }
        if (cross) {
          g.setLineDash([]);
          g.beginPath();
          g.moveTo(5, 5);
          g.lineTo(9, 9);
          g.moveTo(9, 5);
          g.lineTo(5, 9);
          g.stroke();
        }
      });
    return h(
      "details",
      { class: "map-legend", open: true },
      h("summary", null, t("map.legend")),
      h(
        "ul",
        null,
        ...sevItems,
        h("li", null, dot(PRESENCE_COLOR.online, null), t("map.legendOnline")),
        h("li", null, dot(null, PRESENCE_COLOR.offline, false, true), t("map.legendOffline")),
        h("li", null, dot(null, PRESENCE_COLOR.stale, true), t("map.legendStale")),
        h("li", null, dot(PRESENCE_COLOR.unknown, null), t("map.legendUnknown")),
        h(
          "li",
          null,
          swatch((g) => {
            g.beginPath();
            g.arc(7, 7, 6, 0, Math.PI * 2);
            g.lineWidth = 2;
            g.strokeStyle = PRESENCE_COLOR.online;
            g.stroke();
            g.fillStyle = "#1f2b3a";
            g.fill();
          }),
          t("map.legendCluster"),
        ),
      ),
    );
  }

  // -- input -----------------------------------------------------------------------------

  private hit(x: number, y: number): Drawn | null {
    let best: Drawn | null = null;
    let bestD = Infinity;
    for (let i = this.drawn.length - 1; i >= 0; i--) {
      const d = this.drawn[i]!;
      const dist = Math.hypot(d.x - x, d.y - y);
      if (dist <= d.r + 3 && dist < bestD) {
        best = d;
        bestD = dist;
      }
    }
    return best;
  }

  private bindInput(): void {
    const c = this.canvas;
    let drag: { x: number; y: number; moved: boolean; id: number } | null = null;
    c.addEventListener("pointerdown", (e) => {
      try {
        c.setPointerCapture(e.pointerId);
      } catch {
        // a synthetic pointer (tests, benchmarks) cannot be captured; dragging still works
      }
      drag = { x: e.clientX, y: e.clientY, moved: false, id: e.pointerId };
    });
    c.addEventListener("pointermove", (e) => {
      const rect = c.getBoundingClientRect();
      if (drag && drag.id === e.pointerId) {
        const dx = e.clientX - drag.x;
        const dy = e.clientY - drag.y;
        if (drag.moved || Math.abs(dx) + Math.abs(dy) > 4) {
          drag.moved = true;
          drag.x = e.clientX;
          drag.y = e.clientY;
          this.panBy(dx, dy);
          this.tooltip.hidden = true;
          this.hidePopup();
        }
        return;
      }
      this.hover(e.clientX - rect.left, e.clientY - rect.top);
    });
    c.addEventListener("pointerup", (e) => {
      const wasDrag = drag?.moved ?? false;
      drag = null;
      if (wasDrag) return;
      const rect = c.getBoundingClientRect();
      this.click(e.clientX - rect.left, e.clientY - rect.top);
    });
    c.addEventListener("pointerleave", () => {
      this.tooltip.hidden = true;
    });
    c.addEventListener(
      "wheel",
      (e) => {
        e.preventDefault();
        const rect = c.getBoundingClientRect();
        this.zoomAt(-e.deltaY * 0.0025, e.clientX - rect.left, e.clientY - rect.top);
      },
      { passive: false },
    );
    c.addEventListener("dblclick", (e) => {
      const rect = c.getBoundingClientRect();
      this.zoomAt(1, e.clientX - rect.left, e.clientY - rect.top);
    });
    c.addEventListener("keydown", (e) => {
      const step = 60;
      let handled = true;
      switch (e.key) {
        case "ArrowLeft":
          this.panBy(step, 0);
          break;
        case "ArrowRight":
          this.panBy(-step, 0);
          break;
        case "ArrowUp":
          this.panBy(0, step);
          break;
        case "ArrowDown":
          this.panBy(0, -step);
          break;
        case "+":
        case "=":
          this.zoomAt(1, this.width / 2, this.height / 2);
          break;
        case "-":
          this.zoomAt(-1, this.width / 2, this.height / 2);
          break;
        case "0":
          this.fit();
          break;
        case "Escape":
          this.hidePopup();
          break;
        case "Enter": {
          const rec = store.deviceList[this.selected];
          if (rec) this.onOpenDevice(rec.id);
          else handled = false;
          break;
        }
        default:
          handled = false;
      }
      if (handled) e.preventDefault();
    });
  }

  private hover(x: number, y: number): void {
    const d = this.hit(x, y);
    if (!d) {
      this.tooltip.hidden = true;
      return;
    }
    const list = store.deviceList;
    let text: string;
    if (d.device >= 0) {
      const rec = list[d.device]!;
      const worst = SEVERITIES[this.worstOf(rec)];
      text = `${rec.id} · ${rec.kind ?? ""} · ${tDynamic(`presence.${STATUS_NAMES[this.statusOf(rec)]}`, "")}${worst ? ` · ${severityLabel(worst)}` : ""}`;
    } else {
      const sev = SEVERITIES[d.worst];
      text = `${t("map.cluster", { count: d.count })}${sev ? ` · ${severityLabel(sev)}` : ""}`;
    }
    this.tooltip.textContent = text;
    this.tooltip.hidden = false;
    this.tooltip.style.left = `${Math.min(x + 14, this.width - 200)}px`;
    this.tooltip.style.top = `${y + 14}px`;
  }

  private click(x: number, y: number): void {
    const d = this.hit(x, y);
    if (!d) {
      this.hidePopup();
      this.selected = -1;
      this.request();
      return;
    }
    if (d.device < 0) {
      this.zoomAt(2, x, y);
      return;
    }
    // Devices of one site share a position: every marker under the pointer.
    const here = this.drawn.filter((m) => m.device >= 0 && Math.hypot(m.x - d.x, m.y - d.y) <= 4);
    this.selected = d.device;
    this.request();
    if (here.length > 1) this.showSite(here.map((m) => store.deviceList[m.device]!), x, y);
    else this.showPopup(store.deviceList[d.device]!, x, y);
  }

  private showSite(recs: DeviceRec[], x: number, y: number): void {
    recs.sort((a, b) => this.worstOf(a) - this.worstOf(b) || a.id.localeCompare(b.id));
    replaceChildren(
      this.popup,
      h("h3", null, t("map.cluster", { count: recs.length })),
      h(
        "ul",
        { class: "site-list" },
        ...recs.map((rec) => {
          const sev = SEVERITIES[this.worstOf(rec)];
          const status = STATUS_NAMES[this.statusOf(rec)];
          return h(
            "li",
            { "data-device-id": rec.id },
            sev ? severityIcon(sev, 12) : null,
            h("a", { href: href({ name: "device", id: rec.id }), "aria-label": `${t("map.openDevice")} ${rec.id}` }, rec.id),
            h("span", { class: `presence-tag p-${status}` }, ` ${tDynamic(`presence.${status}`, "")}`),
          );
        }),
      ),
    );
    this.popup.hidden = false;
    this.popup.style.left = `${Math.min(x + 12, this.width - 330)}px`;
    this.popup.style.top = `${Math.max(8, Math.min(y + 12, this.height - 40 - recs.length * 22))}px`;
  }

  private showPopup(rec: DeviceRec, x: number, y: number): void {
    const alerts = store.alertsOfDevice(rec.id);
    const rows = [...rec.series.entries()].slice(0, 6).map(([channel, v]) =>
      h("tr", null, h("td", null, channel), h("td", null, v.state ?? formatNumber(v.value)), h("td", null, formatDateTime(v.ts))),
    );
    const open = h("a", { href: href({ name: "device", id: rec.id }), class: "btn btn-small btn-primary" }, t("map.openDevice"));
    replaceChildren(
      this.popup,
      h("h3", null, rec.id),
      h("p", null, `${rec.kind ?? ""} · ${rec.district} · `, h("span", { class: `presence-tag p-${STATUS_NAMES[this.statusOf(rec)]}` }, tDynamic(`presence.${STATUS_NAMES[this.statusOf(rec)]}`, ""))),
      ...alerts.map((a) => h("p", null, h("a", { href: href({ name: "alert", id: a.id }) }, severityIcon(a.severity, 12), ` ${a.message || a.rule_id}`))),
      rows.length ? h("table", null, h("tbody", null, ...rows)) : null,
      h("p", null, open),
    );
    this.popup.hidden = false;
    this.popup.style.left = `${Math.min(x + 12, this.width - 330)}px`;
    this.popup.style.top = `${Math.min(y + 12, this.height - 220)}px`;
  }

  private hidePopup(): void {
    this.popup.hidden = true;
  }

  // -- the DOM renderer (benchmark baseline) ----------------------------------------------

  private buildDom(): void {
    const dom = this.dom!;
    dom.replaceChildren();
    this.domMarkers = store.deviceList.map((rec) => {
      const el = document.createElement("div");
      el.className = this.domClass(rec);
      el.title = rec.id;
      dom.appendChild(el);
      return el;
    });
  }

  private domClass(rec: DeviceRec): string {
    const worst = this.worstOf(rec);
    const st = ["on", "off", "st", "un"][this.statusOf(rec)];
    return worst < NO_ALERT ? `m a${worst}` : `m ${st}`;
  }

  private positionDom(): void {
    const s = this.scale();
    for (const rec of store.deviceList) {
      const el = this.domMarkers[rec.index];
      if (!el) continue;
      const mx = this.mx[rec.index]!;
      if (Number.isNaN(mx)) {
        el.style.display = "none";
        continue;
      }
      el.style.left = `${(mx - this.view.cx) * s + this.width / 2}px`;
      el.style.top = `${(this.my[rec.index]! - this.view.cy) * s + this.height / 2}px`;
    }
  }

  private updateDomClasses(ids: Set<string>): void {
    for (const id of ids) {
      const rec = store.devices.get(id);
      const el = rec ? this.domMarkers[rec.index] : undefined;
      if (rec && el) el.className = this.domClass(rec);
    }
  }

  private updateDomTitles(items: [string, string, number, number | string | null][]): void {
    // What a naive marker does: show its latest value in its tooltip.
    for (const [id, channel, , v] of items) {
      const rec = store.devices.get(id);
      const el = rec ? this.domMarkers[rec.index] : undefined;
      if (el) el.title = `${id} ${channel}: ${v}`;
    }
  }
}
