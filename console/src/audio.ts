// The critical-alert tone: two short beeps from Web Audio (no sound file).
// Browsers only start audio after a user gesture: the context is created on
// the first click or key press (signing in counts). The mute state is kept
// in localStorage and shown in the header.

const STORAGE_KEY = "cityops.muted";

let context: AudioContext | null = null;
let muted = loadMuted();
/** Tones requested so far (played or muted): read by the end-to-end tests. */
let requested = 0;
const listeners = new Set<() => void>();

function loadMuted(): boolean {
  try {
    return localStorage.getItem(STORAGE_KEY) === "1";
  } catch {
    return false;
  }
}

/** Create (or resume) the audio context inside a user gesture. */
export function unlockAudio(): void {
  try {
    if (!context) context = new AudioContext();
    if (context.state === "suspended") void context.resume();
  } catch {
    context = null; // no Web Audio: the visual highlight still works
  }
}

export function isMuted(): boolean {
  return muted;
}

export function setMuted(value: boolean): void {
  muted = value;
  try {
    localStorage.setItem(STORAGE_KEY, value ? "1" : "0");
  } catch {
    // not persisted
  }
  for (const fn of listeners) fn();
}

export function onMuteChange(fn: () => void): () => void {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

export function tonesRequested(): number {
  return requested;
}

/** Two beeps (880 Hz then 660 Hz), unless muted. Returns whether it played. */
export function playCriticalTone(): boolean {
  requested++;
  document.documentElement.dataset["tones"] = String(requested);
  if (muted || !context) return false;
  const now = context.currentTime;
  for (const [i, freq] of [880, 660].entries()) {
    const osc = context.createOscillator();
    const gain = context.createGain();
    osc.type = "sine";
    osc.frequency.value = freq;
    const start = now + i * 0.22;
    gain.gain.setValueAtTime(0.0001, start);
    gain.gain.exponentialRampToValueAtTime(0.3, start + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, start + 0.18);
    osc.connect(gain).connect(context.destination);
    osc.start(start);
    osc.stop(start + 0.2);
  }
  return true;
}
