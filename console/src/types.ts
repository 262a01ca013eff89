// Shapes of what the control API sends, as the console uses them.
//
// Times inside the console are epoch seconds (numbers), whatever the source:
// the live websocket sends epoch seconds, REST sends ISO 8601 strings, and
// `normalizeAlert` turns both into one shape.

export const SEVERITIES = ["critical", "major", "minor", "warning"] as const;
export type Severity = (typeof SEVERITIES)[number];

export const OPEN_STATES = [
  "active_unacked",
  "active_acked",
  "cleared_unacked",
  "shelved",
  "suppressed",
  "out_of_service",
] as const;
export type AlertState = (typeof OPEN_STATES)[number] | "closed" | "normal";

export const DOMAINS = ["traffic", "facility", "emergency"] as const;
export type Domain = (typeof DOMAINS)[number];

export type Presence = "online" | "offline" | "unknown";
export type Source = "live" | "replay" | "drill";
export type Permission = "view" | "alerts" | "engineering" | "admin";
export type Role = "operator" | "responder" | "engineer" | "admin";

export interface Me {
  name: string;
  role: Role;
  via: "session" | "token";
  permissions: Permission[];
  csrf_token: string | null;
}

export interface Alert {
  id: string;
  rule_id: string;
  rule_name: string;
  subject: string;
  severity: Severity;
  state: AlertState;
  version: number;
  message: string;
  raised_at: number;
  updated_at: number;
  active: boolean;
  acked: boolean;
  occurrences: number;
  value: number | null;
  device_id: string | null;
  channel: string | null;
  district: string;
  domain: string | null;
  acked_by: string | null;
  acked_at: number | null;
  cleared_at: number | null;
  closed_at: number | null;
  assignee: string | null;
  shelved_until: number | null;
  shelve_reason: string | null;
  escalation_level: number;
  chattering: boolean;
  incident_id: string | null;
  source: Source;
  ack_role: string | null;
}

export interface AlertEvent {
  version: number;
  action: string;
  from_state: string;
  to_state: string;
  actor: string;
  at: number;
  note: string;
  notify: string | null;
}

export interface SeriesValue {
  ts: number | null;
  value: number | null;
  state: string | null;
  unit: string | null;
}

export interface SnapshotDevice {
  id: string;
  domain: string;
  district: string;
  kind: string | null;
  name: string | null;
  lat: number | null;
  lon: number | null;
  presence: Presence;
  session: number | null;
  stale_since: number | null;
  out_of_service: boolean;
  series: Record<string, SeriesValue>;
}

export interface Kpis {
  alerts_open: Record<string, number>;
  alerts_open_total: number;
  alerts_unacked: number;
  devices: Record<string, number>;
  readings_per_s: number;
  freshness_s: number | null;
  at: number;
}

export interface CityDistrict {
  name: string;
  label: string;
  use: string;
  polygon: [number, number][];
}

export interface CityRoad {
  id: string;
  name: string;
  points: [number, number][];
}

export interface CityKind {
  domain: string;
  channels: string[];
  period_s: number;
}

/** A device of the city model: `[id, kind, domain, district, lat, lon]`. */
export type CityDevice = [string, string, string, string, number, number];

/** `GET /api/v1/city` as the API sends it (optional fields: later API versions). */
export interface CityResponse {
  name: string;
  label: string;
  utc_offset_h?: number;
  timezone?: string;
  bounds: [number, number, number, number] | { south: number; west: number; north: number; east: number };
  districts: CityDistrict[];
  roads?: CityRoad[];
  kinds?: Record<string, CityKind>;
  devices?: number | CityDevice[];
}

/** The city as the console uses it. */
export interface City {
  name: string;
  label: string;
  timezone: string;
  bounds: { south: number; west: number; north: number; east: number };
  districts: CityDistrict[];
  roads: CityRoad[];
  kinds: Record<string, CityKind>;
  devices: CityDevice[];
}

export interface RuleSubject {
  domains: string[];
  districts: string[];
  kinds: string[];
  devices: string[];
  channels: string[];
}

export interface RuleInfo {
  id: string;
  name: string;
  severity: Severity;
  subject: RuleSubject;
  when: string;
  clear_when: string;
  ack_role: string;
  resolve_manually: boolean;
}

export interface HistoryPoint {
  ts: string;
  value: number | null;
  state: string | null;
  readings: number | null;
  min: number | null;
  max: number | null;
  avg: number | null;
  devices: number | null;
}

export interface SeriesHistory {
  device_id: string;
  channel: string;
  unit: string | null;
  kind: "numeric" | "state";
  bucket: "raw" | "1m" | "15m" | "1h" | "1d";
  start: string;
  end: string;
  points: HistoryPoint[];
}

export interface GroupHistory {
  channel: string;
  bucket: string;
  devices: number;
  points: HistoryPoint[];
}

export interface Recording {
  name: string;
  size_bytes: number;
  messages: number;
  duration_s: number | null;
  first_at: string | null;
  last_at: string | null;
  complete: boolean;
}

export interface Job {
  id: string;
  kind: "replay" | "simulation";
  state: "running" | "paused" | "stopped" | "finished" | "failed";
  mode: "sandbox" | "drill";
  parameters: Record<string, unknown>;
  started_by: string;
  started_at: string;
  ended_at: string | null;
  error: string | null;
  progress: {
    published: number;
    acked: number;
    position_s: number;
    total_s: number | null;
    fraction: number | null;
    total_messages: number | null;
  };
}

const TIME_FIELDS = [
  "raised_at",
  "updated_at",
  "acked_at",
  "cleared_at",
  "closed_at",
  "shelved_until",
] as const;

function toEpoch(value: unknown): number | null {
  if (value === null || value === undefined) return null;
  if (typeof value === "number") return value;
  if (typeof value === "string") {
    const ms = Date.parse(value);
    return Number.isNaN(ms) ? null : ms / 1000;
  }
  return null;
}

/** One alert shape from a websocket alert dict or a REST `AlertOut`. */
export function normalizeAlert(raw: Record<string, unknown>): Alert {
  const a = { ...raw } as Record<string, unknown>;
  for (const field of TIME_FIELDS) a[field] = toEpoch(a[field]);
  a["rule_name"] = typeof a["rule_name"] === "string" ? a["rule_name"] : "";
  a["domain"] = typeof a["domain"] === "string" ? a["domain"] : null;
  a["ack_role"] = typeof a["ack_role"] === "string" ? a["ack_role"] : null;
  a["message"] = typeof a["message"] === "string" ? a["message"] : "";
  a["raised_at"] = a["raised_at"] ?? 0;
  a["updated_at"] = a["updated_at"] ?? a["raised_at"];
  return a as unknown as Alert;
}

export function normalizeEvent(raw: Record<string, unknown>): AlertEvent {
  return { ...(raw as unknown as AlertEvent), at: toEpoch(raw["at"]) ?? 0 };
}

export function isOpen(state: AlertState): boolean {
  return state !== "closed" && state !== "normal";
}

export function isUnacked(state: AlertState): boolean {
  return state === "active_unacked" || state === "cleared_unacked";
}

export function parseTime(iso: string | null): number | null {
  return toEpoch(iso);
}

/** The city response in one shape, whatever fields this API version sends. */
export function normalizeCity(raw: CityResponse): City {
  const b = raw.bounds;
  const bounds = Array.isArray(b) ? { south: b[0], west: b[1], north: b[2], east: b[3] } : b;
  let timezone = raw.timezone ?? "Asia/Tokyo";
  if (!raw.timezone && typeof raw.utc_offset_h === "number" && raw.utc_offset_h !== 9) {
    // Only an offset: a fixed-offset zone (Etc/GMT signs are inverted).
    const h = raw.utc_offset_h;
    if (Number.isInteger(h)) timezone = h === 0 ? "UTC" : `Etc/GMT${h > 0 ? "-" : "+"}${Math.abs(h)}`;
  }
  return {
    name: raw.name,
    label: raw.label,
    timezone,
    bounds,
    districts: raw.districts ?? [],
    roads: raw.roads ?? [],
    kinds: raw.kinds ?? {},
    devices: Array.isArray(raw.devices) ? raw.devices : [],
  };
}
