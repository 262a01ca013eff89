// Times in the city's time zone, ISO 8601 style (2024-05-01 13:45:07), and numbers.

import { currentLanguage } from "./i18n";

let timeZone = "Asia/Tokyo";
const formatters = new Map<string, Intl.DateTimeFormat>();

export function setTimeZone(zone: string): void {
  try {
    new Intl.DateTimeFormat("en", { timeZone: zone });
    timeZone = zone;
  } catch {
    timeZone = "Asia/Tokyo";
  }
  formatters.clear();
}

export function getTimeZone(): string {
  return timeZone;
}

function parts(epochS: number): Record<string, string> {
  let f = formatters.get(timeZone);
  if (!f) {
    f = new Intl.DateTimeFormat("en-CA", {
      timeZone,
      year: "numeric",
      month: "2-digit",
      day: "2-digit",
      hour: "2-digit",
      minute: "2-digit",
      second: "2-digit",
      hourCycle: "h23",
    });
    formatters.set(timeZone, f);
  }
  const out: Record<string, string> = {};
  for (const p of f.formatToParts(new Date(epochS * 1000))) out[p.type] = p.value;
  return out;
}

/** `2024-05-01 13:45:07` in the city's zone. */
export function formatDateTime(epochS: number | null | undefined): string {
  if (epochS === null || epochS === undefined || !Number.isFinite(epochS)) return "—";
  const p = parts(epochS);
  return `${p["year"]}-${p["month"]}-${p["day"]} ${p["hour"]}:${p["minute"]}:${p["second"]}`;
}

/** `13:45:07` in the city's zone. */
export function formatTime(epochS: number | null | undefined): string {
  if (epochS === null || epochS === undefined || !Number.isFinite(epochS)) return "—";
  const p = parts(epochS);
  return `${p["hour"]}:${p["minute"]}:${p["second"]}`;
}

/** `2024-05-01T13:45` for a datetime-local input, in the city's zone. */
export function toLocalInput(epochS: number): string {
  const p = parts(epochS);
  return `${p["year"]}-${p["month"]}-${p["day"]}T${p["hour"]}:${p["minute"]}`;
}

/** The epoch seconds of a datetime-local value read in the city's zone. */
export function fromLocalInput(value: string): number | null {
  const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2}))?$/.exec(value);
  if (!m) return null;
  const [, y, mo, d, hh, mm, ss] = m;
  const asUtc = Date.UTC(+y!, +mo! - 1, +d!, +hh!, +mm!, +(ss ?? 0)) / 1000;
  // The zone's offset at that instant (twice: correct across a DST change).
  let guess = asUtc - offsetS(asUtc);
  guess = asUtc - offsetS(guess);
  return guess;
}

function offsetS(epochS: number): number {
  const p = parts(epochS);
  const local = Date.UTC(+p["year"]!, +p["month"]! - 1, +p["day"]!, +p["hour"]!, +p["minute"]!, +p["second"]!);
  return Math.round(local / 1000 - Math.floor(epochS));
}

/** `+09:00`: the zone's UTC offset now. */
export function zoneOffsetLabel(epochS = Date.now() / 1000): string {
  const s = offsetS(epochS);
  const sign = s < 0 ? "-" : "+";
  const abs = Math.abs(s);
  return `${sign}${String(Math.floor(abs / 3600)).padStart(2, "0")}:${String(Math.floor((abs % 3600) / 60)).padStart(2, "0")}`;
}

/** A duration in words: `12 s`, `5 min`, `3 h 20 min`, `2 d`. */
export function formatDuration(seconds: number): string {
  const ja = currentLanguage() === "ja";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return ja ? `${s}秒` : `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return ja ? `${m}分` : `${m} min`;
  const hrs = Math.floor(m / 60);
  if (hrs < 48) {
    const rest = m % 60;
    if (ja) return rest ? `${hrs}時間${rest}分` : `${hrs}時間`;
    return rest ? `${hrs} h ${rest} min` : `${hrs} h`;
  }
  const days = Math.floor(hrs / 24);
  return ja ? `${days}日` : `${days} d`;
}

export function formatNumber(value: number | null | undefined, digits = 2): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return "—";
  const abs = Math.abs(value);
  const d = abs >= 1000 ? 0 : abs >= 100 ? 1 : digits;
  return value.toLocaleString(currentLanguage() === "ja" ? "ja-JP" : "en-US", {
    maximumFractionDigits: d,
  });
}

export function formatCount(value: number): string {
  return value.toLocaleString(currentLanguage() === "ja" ? "ja-JP" : "en-US");
}
