// The console's picture of the city: devices, open alerts, KPIs, the alert
// feed. The live connection writes into it; views read it and subscribe to
// what changed. Writes are cheap (Map updates); views redraw at most once per
// animation frame, so a flood of readings never blocks the page.

import type {
  Alert,
  AlertEvent,
  City,
  Kpis,
  Presence,
  RuleInfo,
  SnapshotDevice,
  Source,
} from "./types";
import { isOpen, isUnacked, normalizeAlert, normalizeEvent, SEVERITIES } from "./types";
import { severityRank } from "./severity";

export interface SeriesLatest {
  ts: number;
  value: number | null;
  state: string | null;
  unit: string | null;
}

export interface DeviceRec {
  id: string;
  domain: string;
  district: string;
  kind: string | null;
  lat: number | null;
  lon: number | null;
  presence: Presence;
  session: number | null;
  staleSince: number | null;
  outOfService: boolean;
  series: Map<string, SeriesLatest>;
  /** Severity rank of the worst open alert (SEVERITIES.length: none). */
  worst: number;
  /** Index in `Store.deviceList` (stable for the life of a snapshot). */
  index: number;
}

export interface FeedEntry {
  alert: Alert;
  event: AlertEvent;
  receivedAt: number;
  /** Arrived after the snapshot (not part of the starting picture). */
  fresh: boolean;
}

export type ReadingItem = [string, string, number, number | string | null];

type Listener<T> = (payload: T) => void;

class Channel<T> {
  private readonly listeners = new Set<Listener<T>>();

  on(fn: Listener<T>): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  emit(payload: T): void {
    for (const fn of this.listeners) {
      try {
        fn(payload);
      } catch (exc) {
        // One broken view must not stop the others (nor the live connection).
        console.error("listener failed", exc);
      }
    }
  }
}

const NO_ALERT = SEVERITIES.length;
const FEED_LIMIT = 200;

export class Store {
  city: City | null = null;
  rules = new Map<string, RuleInfo>();
  source: Source = "live";
  runId: string | null = null;

  devices = new Map<string, DeviceRec>();
  deviceList: DeviceRec[] = [];
  alerts = new Map<string, Alert>();
  private alertsByDevice = new Map<string, Set<string>>();
  kpis: Kpis | null = null;
  kpisReceivedAt = 0;
  feed: FeedEntry[] = [];
  snapshotAt = 0;
  /** When the last frame of any kind arrived (ms, performance clock). */
  lastFrameAt = 0;
  /** Wall-clock time (s) of the last frame (for "as of" messages). */
  lastFrameWall = 0;

  /** A snapshot replaced everything. */
  readonly reset = new Channel<void>();
  /** Devices whose drawn state changed (presence, staleness, worst alert, new). */
  readonly devicesChanged = new Channel<Set<string>>();
  /** Readings as they arrive (charts, latest-value tables). */
  readonly readings = new Channel<ReadingItem[]>();
  /** One alert changed (raised, acknowledged, closed…). */
  readonly alertChanged = new Channel<FeedEntry>();
  readonly kpisChanged = new Channel<void>();
  readonly sourceChanged = new Channel<void>();

  /**
   * Where devices are, by id: from the city model when the API sends its
   * devices, and from every snapshot that knew a position. A replay's
   * sandbox knows no positions of its own: devices keep the ones seen live.
   */
  private cityPositions = new Map<string, { kind: string; lat: number; lon: number; domain: string; district: string }>();

  setCity(city: City): void {
    this.city = city;
    this.cityPositions.clear();
    for (const [id, kind, domain, district, lat, lon] of city.devices) {
      this.cityPositions.set(id, { kind, lat, lon, domain, district });
    }
  }

  setRules(rules: RuleInfo[]): void {
    this.rules = new Map(rules.map((r) => [r.id, r]));
    for (const alert of this.alerts.values()) this.enrich(alert);
  }

  setSource(source: Source): void {
    if (this.source === source) return;
    this.source = source;
    this.sourceChanged.emit();
  }

  // -- applying frames ---------------------------------------------------------------

  applySnapshot(frame: {
    source: Source;
    run: string | null;
    at: number;
    devices: SnapshotDevice[];
    alerts: Record<string, unknown>[];
    kpis: Kpis;
  }): void {
    this.devices.clear();
    this.deviceList = [];
    this.alerts.clear();
    this.alertsByDevice.clear();
    this.runId = frame.run;
    this.snapshotAt = frame.at;
    // Every device of the city model is drawn, reporting or not; the
    // snapshot adds what the database knows (and devices outside the model).
    for (const [id, pos] of this.cityPositions) {
      this.addDevice({
        id,
        domain: pos.domain,
        district: pos.district,
        kind: pos.kind,
        name: null,
        lat: pos.lat,
        lon: pos.lon,
        presence: "unknown",
        session: null,
        stale_since: null,
        out_of_service: false,
        series: {},
      });
    }
    for (const d of frame.devices) {
      if (d.lat !== null && d.lon !== null && d.kind !== null) {
        this.cityPositions.set(d.id, { kind: d.kind, lat: d.lat, lon: d.lon, domain: d.domain, district: d.district });
      }
      const rec = this.devices.get(d.id) ?? this.addDevice(d);
      rec.domain = d.domain;
      rec.district = d.district;
      rec.kind = d.kind ?? rec.kind;
      rec.lat = d.lat ?? rec.lat;
      rec.lon = d.lon ?? rec.lon;
      rec.presence = d.presence;
      rec.session = d.session;
      rec.staleSince = d.stale_since;
      rec.outOfService = d.out_of_service;
      for (const [channel, s] of Object.entries(d.series)) {
        if (s.ts !== null) rec.series.set(channel, { ts: s.ts, value: s.value, state: s.state, unit: s.unit });
      }
    }
    for (const raw of frame.alerts) {
      const alert = normalizeAlert(raw);
      if (!isOpen(alert.state)) continue;
      this.enrich(alert);
      this.alerts.set(alert.id, alert);
      this.indexAlert(alert);
    }
    for (const rec of this.deviceList) rec.worst = this.worstOf(rec.id);
    this.kpis = frame.kpis;
    this.kpisReceivedAt = performance.now();
    this.feed = [...this.alerts.values()]
      .sort((a, b) => b.updated_at - a.updated_at)
      .slice(0, FEED_LIMIT)
      .map((alert) => ({
        alert,
        event: {
          version: alert.version,
          action: "raise",
          from_state: "normal",
          to_state: alert.state,
          actor: "cityops",
          at: alert.raised_at,
          note: "",
          notify: null,
        },
        receivedAt: Date.now() / 1000,
        fresh: false,
      }));
    this.reset.emit();
    this.kpisChanged.emit();
  }

  applyReadings(items: ReadingItem[]): void {
    let added: Set<string> | null = null;
    for (const item of items) {
      const [deviceId, channel, ts, v] = item;
      let rec = this.devices.get(deviceId);
      if (!rec) {
        rec = this.addDevice({
          id: deviceId,
          domain: "",
          district: "",
          kind: null,
          name: null,
          lat: null,
          lon: null,
          presence: "unknown",
          session: null,
          stale_since: null,
          out_of_service: false,
          series: {},
        });
        (added ??= new Set()).add(deviceId);
      }
      const current = rec.series.get(channel);
      if (current && current.ts > ts) continue; // a late reading never replaces a newer one
      const unit = current?.unit ?? null;
      if (typeof v === "string") rec.series.set(channel, { ts, value: null, state: v, unit });
      else rec.series.set(channel, { ts, value: v, state: null, unit });
      if (rec.staleSince !== null) {
        rec.staleSince = null;
        (added ??= new Set()).add(deviceId);
      }
    }
    this.readings.emit(items);
    if (added) this.devicesChanged.emit(added);
  }

  applyAlert(
    rawAlert: Record<string, unknown>,
    rawEvent: Record<string, unknown>,
    options: { feed?: boolean } = {},
  ): FeedEntry | null {
    const alert = normalizeAlert(rawAlert);
    const event = normalizeEvent(rawEvent);
    const known = this.alerts.get(alert.id);
    if (known && known.version >= alert.version) return null; // a duplicate or older event
    this.enrich(alert, known);
    if (known) this.unindexAlert(known);
    if (isOpen(alert.state)) {
      this.alerts.set(alert.id, alert);
      this.indexAlert(alert);
    } else {
      this.alerts.delete(alert.id);
    }
    if (alert.device_id) {
      const rec = this.devices.get(alert.device_id);
      if (rec) {
        const worst = this.worstOf(rec.id);
        if (worst !== rec.worst) {
          rec.worst = worst;
          this.devicesChanged.emit(new Set([rec.id]));
        }
      }
    }
    const entry: FeedEntry = { alert, event, receivedAt: Date.now() / 1000, fresh: options.feed !== false };
    if (entry.fresh) {
      this.feed.unshift(entry);
      if (this.feed.length > FEED_LIMIT) this.feed.length = FEED_LIMIT;
    }
    this.alertChanged.emit(entry);
    this.kpisChanged.emit();
    return entry;
  }

  /**
   * An alert as a REST action returned it. The live event of the same
   * version may come later (then it is a duplicate and dropped) or came
   * first (then this is): either way the feed shows the action once.
   */
  applyAlertFromRest(raw: Record<string, unknown>, action: string | null, actor = ""): void {
    const alert = normalizeAlert(raw);
    const known = this.alerts.get(alert.id);
    if (known && known.version >= alert.version) return;
    this.applyAlert(
      raw,
      {
        version: alert.version,
        action: action ?? "update",
        from_state: known?.state ?? alert.state,
        to_state: alert.state,
        actor,
        at: alert.updated_at,
        note: "",
        notify: null,
      },
      { feed: action !== null },
    );
  }

  applyPresence(frame: {
    device: string;
    domain: string | null;
    district: string | null;
    presence?: Presence;
    session?: number;
    stale?: boolean;
    stale_since?: number | null;
  }): void {
    let rec = this.devices.get(frame.device);
    if (!rec) {
      rec = this.addDevice({
        id: frame.device,
        domain: frame.domain ?? "",
        district: frame.district ?? "",
        kind: null,
        name: null,
        lat: null,
        lon: null,
        presence: "unknown",
        session: null,
        stale_since: null,
        out_of_service: false,
        series: {},
      });
    }
    if (frame.presence !== undefined) {
      if (rec.session !== null && frame.session !== undefined && frame.session < rec.session) return;
      rec.presence = frame.presence;
      rec.session = frame.session ?? rec.session;
    }
    if (frame.stale !== undefined) rec.staleSince = frame.stale ? (frame.stale_since ?? Date.now() / 1000) : null;
    this.devicesChanged.emit(new Set([rec.id]));
  }

  applyKpis(kpis: Kpis): void {
    this.kpis = kpis;
    this.kpisReceivedAt = performance.now();
    this.kpisChanged.emit();
  }

  // -- reading -----------------------------------------------------------------------

  /** Open alerts by severity and unacknowledged, from the alerts held (exact, immediate). */
  alertCounts(): { bySeverity: Record<string, number>; total: number; unacked: number } {
    const bySeverity: Record<string, number> = Object.fromEntries(SEVERITIES.map((s) => [s, 0]));
    let unacked = 0;
    for (const a of this.alerts.values()) {
      bySeverity[a.severity] = (bySeverity[a.severity] ?? 0) + 1;
      if (isUnacked(a.state)) unacked++;
    }
    return { bySeverity, total: this.alerts.size, unacked };
  }

  /** Devices by status (offline > stale > online > unknown), counted from what is held. */
  deviceCounts(): Record<string, number> {
    const counts: Record<string, number> = { online: 0, offline: 0, stale: 0, unknown: 0, total: 0 };
    for (const rec of this.deviceList) {
      counts[this.deviceStatus(rec)]! += 1;
      counts["total"]! += 1;
    }
    return counts;
  }

  /** Data freshness now: the server's figure plus the time since it was sent. */
  freshnessNow(): number | null {
    if (!this.kpis || this.kpis.freshness_s === null || this.kpis.freshness_s === undefined) return null;
    return this.kpis.freshness_s + (performance.now() - this.kpisReceivedAt) / 1000;
  }

  deviceStatus(rec: DeviceRec): "offline" | "stale" | "online" | "unknown" {
    if (rec.presence === "offline") return "offline";
    if (rec.staleSince !== null) return "stale";
    return rec.presence === "online" ? "online" : "unknown";
  }

  alertsOfDevice(deviceId: string): Alert[] {
    const ids = this.alertsByDevice.get(deviceId);
    if (!ids) return [];
    return [...ids].map((id) => this.alerts.get(id)).filter((a): a is Alert => a !== undefined);
  }

  rule(ruleId: string): RuleInfo | undefined {
    return this.rules.get(ruleId);
  }

  // -- internals ---------------------------------------------------------------------

  private addDevice(d: SnapshotDevice): DeviceRec {
    const pos = this.cityPositions.get(d.id);
    const rec: DeviceRec = {
      id: d.id,
      domain: d.domain || pos?.domain || "",
      district: d.district || pos?.district || "",
      kind: d.kind ?? pos?.kind ?? null,
      lat: d.lat ?? pos?.lat ?? null,
      lon: d.lon ?? pos?.lon ?? null,
      presence: d.presence,
      session: d.session,
      staleSince: d.stale_since,
      outOfService: d.out_of_service,
      series: new Map(),
      worst: NO_ALERT,
      index: this.deviceList.length,
    };
    this.devices.set(rec.id, rec);
    this.deviceList.push(rec);
    return rec;
  }

  private enrich(alert: Alert, previous?: Alert): void {
    const rule = this.rules.get(alert.rule_id);
    if (!alert.rule_name) alert.rule_name = rule?.name ?? previous?.rule_name ?? "";
    if (!alert.ack_role) alert.ack_role = rule?.ack_role ?? previous?.ack_role ?? null;
    if (!alert.domain) {
      const device = alert.device_id ? this.devices.get(alert.device_id) : undefined;
      alert.domain =
        device?.domain ||
        (rule && rule.subject.domains.length === 1 ? (rule.subject.domains[0] ?? null) : null) ||
        previous?.domain ||
        null;
    }
  }

  private indexAlert(alert: Alert): void {
    if (!alert.device_id) return;
    let set = this.alertsByDevice.get(alert.device_id);
    if (!set) this.alertsByDevice.set(alert.device_id, (set = new Set()));
    set.add(alert.id);
  }

  private unindexAlert(alert: Alert): void {
    if (!alert.device_id) return;
    this.alertsByDevice.get(alert.device_id)?.delete(alert.id);
  }

  private worstOf(deviceId: string): number {
    let worst: number = NO_ALERT;
    const ids = this.alertsByDevice.get(deviceId);
    if (!ids) return worst;
    for (const id of ids) {
      const a = this.alerts.get(id);
      if (a && a.state !== "shelved" && a.state !== "suppressed" && a.state !== "out_of_service") {
        worst = Math.min(worst, severityRank(a.severity));
      }
    }
    return worst;
  }
}

export const store = new Store();
