// Console settings kept in the browser: the optional basemap and the stale limit.

export interface Settings {
  /** A raster tile URL template (`…/{z}/{x}/{y}.png`); empty: districts only. */
  basemapUrl: string;
  /** Mark the screen stale after this many seconds without a frame. */
  staleAfterS: number;
  /** Map renderer: `canvas` (default) or `dom` (one element per device; benchmark baseline). */
  mapRenderer: "canvas" | "dom";
}

const STORAGE_KEY = "cityops.settings";
const DEFAULTS: Settings = { basemapUrl: "", staleAfterS: 10, mapRenderer: "canvas" };

function load(): Settings {
  try {
    const raw = localStorage.getItem(STORAGE_KEY);
    if (!raw) return { ...DEFAULTS };
    const data = JSON.parse(raw) as Partial<Settings>;
    return {
      basemapUrl: typeof data.basemapUrl === "string" ? data.basemapUrl : DEFAULTS.basemapUrl,
      staleAfterS:
        typeof data.staleAfterS === "number" && data.staleAfterS >= 2 ? data.staleAfterS : DEFAULTS.staleAfterS,
      mapRenderer: data.mapRenderer === "dom" ? "dom" : "canvas",
    };
  } catch {
    return { ...DEFAULTS };
  }
}

export const settings: Settings = load();
const listeners = new Set<() => void>();

export function saveSettings(next: Partial<Settings>): void {
  Object.assign(settings, next);
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(settings));
  } catch {
    // not persisted
  }
  for (const fn of listeners) fn();
}

export function onSettingsChange(fn: () => void): () => void {
  listeners.add(fn);
  return () => listeners.delete(fn);
}
