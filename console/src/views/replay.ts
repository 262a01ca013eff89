// Replay (engineers): pick a recording, a speed and a window; start, pause,
// resume, stop; watch the progress. A replay publishes into the sandbox
// (`cityops/replay/{run}/…`), never onto the live topics, and pages nobody;
// the console follows the sandbox and says REPLAY everywhere while it does.

import { api, ApiError } from "../api";
import type { AppContext, View } from "../context";
import { h, replaceChildren } from "../dom";
import { formatCount, formatDateTime, formatDuration } from "../format";
import { t } from "../i18n";
import type { MessageKey } from "../i18n";
import { store } from "../store";
import type { Job, Recording } from "../types";
import { parseTime } from "../types";

const POLL_MS = 1000;

export class ReplayView implements View {
  readonly el: HTMLElement;
  private readonly form: HTMLFormElement;
  private readonly recording: HTMLSelectElement;
  private readonly speed: HTMLInputElement;
  private readonly from: HTMLInputElement;
  private readonly to: HTMLInputElement;
  private readonly runs: HTMLElement;
  private readonly error: HTMLElement;
  private readonly submit: HTMLButtonElement;
  private readonly follow: HTMLButtonElement;
  private timer: number | null = null;
  private recordings: Recording[] = [];
  private destroyed = false;
  private readonly unsubscribe: (() => void)[] = [];

  constructor(private readonly ctx: AppContext) {
    this.recording = h("select", { id: "replay-recording", required: true });
    this.speed = h("input", { id: "replay-speed", type: "number", min: 0, max: 1000, step: "any", value: 10, required: true, "aria-describedby": "replay-speed-help" });
    this.from = h("input", { id: "replay-from", type: "number", min: 0, step: "any", placeholder: "0" });
    this.to = h("input", { id: "replay-to", type: "number", min: 0, step: "any", placeholder: "∞" });
    this.error = h("p", { class: "form-error", role: "alert" });
    this.submit = h("button", { type: "submit", class: "btn btn-primary" }, t("replay.start"));
    this.form = h(
      "form",
      { class: "replay-form", "aria-labelledby": "replay-form-title" },
      h("h2", { id: "replay-form-title" }, t("replay.start")),
      h("label", { for: "replay-recording" }, t("replay.recording")),
      this.recording,
      h("label", { for: "replay-speed" }, t("replay.speed")),
      this.speed,
      h("span", { class: "chart-note", id: "replay-speed-help" }, t("replay.speedHelp")),
      h("div", { class: "row" },
        h("div", null, h("label", { for: "replay-from" }, t("replay.from")), this.from),
        h("div", null, h("label", { for: "replay-to" }, t("replay.to")), this.to),
      ),
      this.error,
      this.submit,
    );
    this.form.addEventListener("submit", (e) => {
      e.preventDefault();
      void this.start();
    });
    this.follow = h("button", { type: "button", class: "btn btn-small", "data-follow": "1" });
    this.follow.addEventListener("click", () => this.ctx.followReplay(store.source === "live"));
    this.runs = h("ol", { class: "runs", "aria-live": "polite" });
    this.el = h(
      "section",
      { class: "page page-replay", "aria-labelledby": "replay-title" },
      h("div", { class: "page-head" }, h("h1", { id: "replay-title" }, t("replay.title")), this.follow),
      h(
        "div",
        { class: "replay-grid" },
        h("div", { class: "panel" }, this.form),
        h("section", { class: "panel", "aria-labelledby": "runs-title" }, h("h2", { id: "runs-title" }, t("replay.runs")), this.runs),
      ),
    );
    this.renderFollow();
    this.unsubscribe.push(store.sourceChanged.on(() => this.renderFollow()));
    void this.loadRecordings();
    void this.poll();
  }

  title(): string {
    return t("replay.title");
  }

  destroy(): void {
    this.destroyed = true;
    if (this.timer !== null) window.clearTimeout(this.timer);
    for (const fn of this.unsubscribe) fn();
  }

  private renderFollow(): void {
    this.follow.textContent = store.source === "live" ? t("replay.follow") : t("replay.backToLive");
    this.follow.setAttribute("aria-pressed", store.source === "live" ? "false" : "true");
  }

  private async loadRecordings(): Promise<void> {
    try {
      this.recordings = await api<Recording[]>("GET", "/api/v1/recordings");
    } catch (exc) {
      this.error.textContent = exc instanceof Error ? exc.message : String(exc);
      return;
    }
    if (!this.recordings.length) {
      replaceChildren(this.recording, h("option", { value: "" }, t("replay.noRecordings")));
      this.submit.disabled = true;
      return;
    }
    replaceChildren(
      this.recording,
      ...this.recordings.map((r) =>
        h(
          "option",
          { value: r.name },
          `${r.name} — ${t("replay.duration", { duration: r.duration_s !== null ? formatDuration(r.duration_s) : "?", messages: formatCount(r.messages) })}`,
        ),
      ),
    );
  }

  private async start(): Promise<void> {
    this.error.textContent = "";
    const speed = Number(this.speed.value);
    const body: Record<string, unknown> = { recording: this.recording.value, speed, mode: "sandbox" };
    if (this.from.value !== "") body["from_s"] = Number(this.from.value);
    if (this.to.value !== "") body["to_s"] = Number(this.to.value);
    this.submit.disabled = true;
    try {
      const job = await api<Job>("POST", "/api/v1/replays", body);
      this.ctx.toast(t("replay.started", { id: job.id }), "success");
      this.ctx.followReplay(true);
    } catch (exc) {
      this.error.textContent = exc instanceof ApiError ? exc.message : String(exc);
    } finally {
      this.submit.disabled = false;
    }
    await this.poll(false);
  }

  private async poll(reschedule = true): Promise<void> {
    if (this.destroyed) return;
    try {
      const jobs = await api<Job[]>("GET", "/api/v1/replays");
      this.renderRuns(jobs);
    } catch {
      // the next poll tries again
    }
    if (reschedule && !this.destroyed) this.timer = window.setTimeout(() => void this.poll(), POLL_MS);
  }

  private renderRuns(jobs: Job[]): void {
    if (!jobs.length) {
      replaceChildren(this.runs, h("li", { class: "chart-note" }, t("replay.noRuns")));
      return;
    }
    replaceChildren(this.runs, ...jobs.map((job) => this.run(job)));
  }

  private run(job: Job): HTMLElement {
    const p = job.progress;
    const fraction = p.fraction ?? (p.total_s ? p.position_s / p.total_s : null);
    const bar = h("progress", { max: 1, value: fraction ?? 0, "aria-label": `${t("replay.progress")} ${job.id}` });
    if (fraction === null) bar.removeAttribute("value");
    const buttons: HTMLElement[] = [];
    const steer = (action: "pause" | "resume" | "stop") => {
      const b = h("button", { type: "button", class: `btn btn-small${action === "stop" ? " btn-danger" : ""}`, "data-steer": action }, t(`replay.${action}` as MessageKey));
      b.addEventListener("click", () => void this.steer(job.id, action));
      buttons.push(b);
    };
    if (job.state === "running") steer("pause");
    if (job.state === "paused") steer("resume");
    if (job.state === "running" || job.state === "paused") steer("stop");
    const messages =
      p.total_messages !== null
        ? t("replay.messages", { published: formatCount(p.published), total: formatCount(p.total_messages) })
        : t("replay.messagesNoTotal", { published: formatCount(p.published) });
    return h(
      "li",
      { class: "run", "data-run": job.id, "data-state": job.state },
      h(
        "div",
        { class: "run-head" },
        h("span", { class: "run-id" }, job.id),
        h("strong", { class: "run-state" }, t(`replay.state.${job.state}` as MessageKey)),
        h("span", { class: "sub" }, `${String(job.parameters["recording"] ?? "")} × ${String(job.parameters["speed"] ?? "")}`),
        h("span", { class: "sub" }, `${t("replay.startedBy")}: ${job.started_by} · ${formatDateTime(parseTime(job.started_at))}`),
      ),
      bar,
      h("div", { class: "chart-note" }, `${fraction !== null ? `${Math.round(fraction * 100)} % · ` : ""}${messages}${p.total_s ? ` · ${formatDuration(p.position_s)} / ${formatDuration(p.total_s)}` : ""}`),
      job.error ? h("p", { class: "form-error" }, job.error) : null,
      h("div", { class: "run-buttons" }, ...buttons),
    );
  }

  private async steer(id: string, action: "pause" | "resume" | "stop"): Promise<void> {
    try {
      await api<Job>("POST", `/api/v1/replays/${encodeURIComponent(id)}/${action}`);
    } catch (exc) {
      this.ctx.toast(t("action.failed", { message: exc instanceof Error ? exc.message : String(exc) }), "error");
    }
    await this.poll(false);
  }
}
