// The live websocket `/api/v1/live`: snapshot, then deltas; resume after a drop.
//
// Connection states, always shown in the header:
//   connecting    first connection (or after switching source)
//   live          frames arrive (the server sends a heartbeat after 5 s of silence)
//   stale         the socket looks open but nothing arrived for `staleAfterS`:
//                 a half-open TCP connection, a stalled proxy, a frozen server.
//                 The screen says so instead of showing old data as live.
//   reconnecting  the socket closed (or was given up after being stale for
//                 twice the limit); a new one opens with jittered backoff and
//                 resumes from the last `{hub, seq}`.
//   signed-out    the server refuses us and `/auth/me` says the session ended.
//
// Flow control: the console connects with `window=N` and confirms each
// applied readings frame with `{"type":"received","seq"}` after the next
// animation frame, so a busy tab holds readings back at the server (where
// they coalesce) instead of piling up frames it cannot draw.

import { store } from "./store";
import type { ReadingItem } from "./store";
import type { Kpis, Presence, SnapshotDevice, Source } from "./types";

export type ConnState = "connecting" | "live" | "stale" | "reconnecting" | "signed-out";

export interface ConnStatus {
  state: ConnState;
  attempt: number;
  /** When the next attempt starts (ms, performance clock), while reconnecting. */
  retryAt: number | null;
  /** Seconds since the last frame. */
  silentS: number;
  /** How the current stream started: a fresh snapshot, or resumed after a drop. */
  start: "snapshot" | "resumed" | null;
  /** Connections that delivered a snapshot or resumed so far. */
  starts: number;
}

interface Options {
  staleAfterS: number;
  window: number;
  /** Checks whether the session still exists after a refused connection. */
  sessionAlive: () => Promise<boolean>;
  onCriticalAlert: (entry: ReturnType<typeof store.applyAlert>) => void;
}

const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 10_000;
const WATCHDOG_MS = 500;
const CONNECT_TIMEOUT_MS = 10_000;

type Frame = { type: string; seq?: number } & Record<string, unknown>;

export class LiveConnection {
  private ws: WebSocket | null = null;
  private hub: string | null = null;
  private seq: number | null = null;
  private attempt = 0;
  private retryTimer: number | null = null;
  private retryAt: number | null = null;
  private watchdog: number | null = null;
  private state: ConnState = "connecting";
  private source: Source = "live";
  private pendingReceived: number | null = null;
  private receivedScheduled = false;
  private stopped = false;
  private lastStart: "snapshot" | "resumed" | null = null;
  private starts = 0;
  private readonly listeners = new Set<(status: ConnStatus) => void>();
  /** Frames taken, for tests and the benchmark. */
  framesIn = 0;

  constructor(private readonly options: Options) {}

  onStatus(fn: (status: ConnStatus) => void): () => void {
    this.listeners.add(fn);
    fn(this.status());
    return () => this.listeners.delete(fn);
  }

  status(): ConnStatus {
    const silentS = store.lastFrameAt ? (performance.now() - store.lastFrameAt) / 1000 : 0;
    return { state: this.state, attempt: this.attempt, retryAt: this.retryAt, silentS, start: this.lastStart, starts: this.starts };
  }

  setStaleAfter(seconds: number): void {
    this.options.staleAfterS = Math.max(2, seconds);
  }

  start(source: Source = "live"): void {
    this.stopped = false;
    this.source = source;
    store.setSource(source);
    this.setState("connecting");
    this.open();
    if (this.watchdog === null) this.watchdog = window.setInterval(() => this.check(), WATCHDOG_MS);
  }

  /** Follow another source (live or the replay sandbox): a fresh snapshot, no resume. */
  switchSource(source: Source): void {
    if (source === this.source) return;
    this.hub = null;
    this.seq = null;
    this.drop();
    this.cancelRetry();
    this.attempt = 0;
    this.start(source);
  }

  stop(): void {
    this.stopped = true;
    this.drop();
    this.cancelRetry();
    if (this.watchdog !== null) window.clearInterval(this.watchdog);
    this.watchdog = null;
  }

  currentSource(): Source {
    return this.source;
  }

  // -- socket --------------------------------------------------------------------------

  private url(): string {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const params = new URLSearchParams({ window: String(this.options.window) });
    if (this.source !== "live") params.set("source", this.source);
    if (this.hub !== null && this.seq !== null) {
      params.set("hub", this.hub);
      params.set("seq", String(this.seq));
    }
    return `${scheme}//${location.host}/api/v1/live?${params.toString()}`;
  }

  private open(): void {
    this.drop();
    let ws: WebSocket;
    try {
      ws = new WebSocket(this.url());
    } catch {
      this.scheduleRetry();
      return;
    }
    this.ws = ws;
    let gotFrame = false;
    // A handshake that hangs (a stalled network) never fails by itself.
    const connectTimer = window.setTimeout(() => {
      if (this.ws === ws && ws.readyState === WebSocket.CONNECTING) {
        this.drop();
        this.scheduleRetry();
      }
    }, CONNECT_TIMEOUT_MS);
    ws.onopen = () => window.clearTimeout(connectTimer);
    ws.onmessage = (event: MessageEvent<string>) => {
      if (this.ws !== ws) return;
      gotFrame = true;
      this.onFrame(event.data);
    };
    ws.onclose = (event: CloseEvent) => {
      window.clearTimeout(connectTimer);
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.stopped) return;
      // Refused before any frame (1008 policy, or 1006 on a refused handshake):
      // maybe the session ended. Ask once; otherwise retry with backoff.
      if (!gotFrame && (event.code === 1008 || event.code === 1006)) {
        void this.options.sessionAlive().then((alive) => {
          if (!alive) this.setState("signed-out");
          else this.scheduleRetry();
        });
        return;
      }
      this.scheduleRetry();
    };
    ws.onerror = () => {
      // onclose follows and decides.
    };
  }

  /** Forget the current socket (its late events are ignored) and close it. */
  private drop(): void {
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onopen = null;
      ws.onmessage = null;
      ws.onclose = null;
      ws.onerror = null;
      try {
        ws.close(1000, "client reconnects");
      } catch {
        // already closing
      }
    }
  }

  private scheduleRetry(): void {
    if (this.stopped || this.retryTimer !== null) return;
    this.attempt++;
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(this.attempt - 1, 5));
    const delay = base / 2 + Math.random() * (base / 2);
    this.retryAt = performance.now() + delay;
    this.setState("reconnecting");
    this.retryTimer = window.setTimeout(() => {
      this.retryTimer = null;
      this.retryAt = null;
      this.open();
    }, delay);
  }

  private cancelRetry(): void {
    if (this.retryTimer !== null) window.clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.retryAt = null;
  }

  /** Once a second or so: stale after silence, give the socket up after twice as long. */
  private check(): void {
    if (this.stopped) return;
    const silentS = store.lastFrameAt ? (performance.now() - store.lastFrameAt) / 1000 : 0;
    if (this.state === "live" && silentS > this.options.staleAfterS) {
      this.setState("stale");
    } else if (this.state === "stale" && silentS > this.options.staleAfterS * 2 && this.ws) {
      // A half-open connection never closes by itself: drop it and resume on a new one.
      this.drop();
      this.scheduleRetry();
    }
    this.emit();
  }

  private setState(state: ConnState): void {
    if (this.state === state) return;
    this.state = state;
    this.emit();
  }

  private emit(): void {
    const status = this.status();
    for (const fn of this.listeners) fn(status);
  }

  // -- frames --------------------------------------------------------------------------

  private onFrame(data: string): void {
    let frame: Frame;
    try {
      frame = JSON.parse(data) as Frame;
    } catch {
      return;
    }
    this.framesIn++;
    store.lastFrameAt = performance.now();
    store.lastFrameWall = Date.now() / 1000;
    if (frame.type === "batch") {
      // Several frames in one message (a burst, e.g. thousands of presence changes
      // when an outage ends): apply each in order, as if it had come alone.
      for (const inner of frame["frames"] as Frame[]) this.dispatch(inner);
      return;
    }
    this.dispatch(frame);
  }

  private dispatch(frame: Frame): void {
    if (typeof frame.seq === "number") this.seq = frame.seq;
    switch (frame.type) {
      case "snapshot":
        this.hub = frame["hub"] as string;
        store.applySnapshot(
          frame as unknown as {
            source: Source;
            run: string | null;
            at: number;
            devices: SnapshotDevice[];
            alerts: Record<string, unknown>[];
            kpis: Kpis;
          },
        );
        if (!performance.getEntriesByName("cityops:snapshot").length) performance.mark("cityops:snapshot");
        this.connected("snapshot");
        break;
      case "resumed":
        this.hub = frame["hub"] as string;
        this.connected("resumed");
        break;
      case "readings":
        store.applyReadings(frame["items"] as ReadingItem[]);
        this.confirm(frame.seq);
        break;
      case "alert": {
        const entry = store.applyAlert(
          frame["alert"] as Record<string, unknown>,
          frame["event"] as Record<string, unknown>,
        );
        if (entry && this.isNewCritical(entry)) this.options.onCriticalAlert(entry);
        break;
      }
      case "presence":
        store.applyPresence(
          frame as unknown as {
            device: string;
            domain: string | null;
            district: string | null;
            presence?: Presence;
            session?: number;
            stale?: boolean;
            stale_since?: number | null;
          },
        );
        break;
      case "kpis":
        store.applyKpis(frame["kpis"] as Kpis);
        break;
      case "heartbeat":
        break;
      case "error":
        console.warn("live: server error", frame["error"]);
        break;
      default:
        break;
    }
    if (this.state === "stale") this.setState("live");
  }

  private connected(how: "snapshot" | "resumed"): void {
    this.attempt = 0;
    this.lastStart = how;
    this.starts++;
    this.cancelRetry();
    this.setState("live");
    this.emit();
  }

  private isNewCritical(entry: NonNullable<ReturnType<typeof store.applyAlert>>): boolean {
    const { alert, event } = entry;
    if (alert.severity !== "critical") return false;
    return event.action === "raise" || (event.action === "escalate" && event.to_state === "active_unacked");
  }

  /** Confirm a readings frame once the page had a chance to draw it. */
  private confirm(seq: number | undefined): void {
    if (seq === undefined) return;
    this.pendingReceived = seq;
    if (this.receivedScheduled) return;
    this.receivedScheduled = true;
    const send = () => {
      this.receivedScheduled = false;
      const ws = this.ws;
      if (ws && ws.readyState === WebSocket.OPEN && this.pendingReceived !== null) {
        ws.send(JSON.stringify({ type: "received", seq: this.pendingReceived }));
      }
      this.pendingReceived = null;
    };
    // A hidden tab draws nothing: confirm at once rather than wait for a frame
    // that the browser will not run.
    if (document.hidden) queueMicrotask(send);
    else requestAnimationFrame(() => setTimeout(send, 0));
  }
}
