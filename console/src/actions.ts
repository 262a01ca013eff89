// What a user may do to an alert, and doing it (REST, with the version seen).
//
// The console only offers what the server would allow: the `alerts`
// permission, a state that allows the action (the ISA-18.2 table of
// rules/alerts.py), and for acknowledge and resolve a role that covers the
// rule's acknowledging role (ROLE_COVERS of rules/model.py). The server checks
// all of it again; a 409 (someone else acted first) shows who and updates the
// screen with the alert as it is now.

import { api, ApiError } from "./api";
import { h } from "./dom";
import { formatTime } from "./format";
import { t } from "./i18n";
import type { MessageKey } from "./i18n";
import { stateLabel } from "./severity";
import { store } from "./store";
import type { Alert, AlertState, Me } from "./types";
import { isUnacked, normalizeAlert } from "./types";

export type ActionName = "acknowledge" | "comment" | "assign" | "shelve" | "unshelve" | "resolve";
export const ACTIONS: ActionName[] = ["acknowledge", "comment", "assign", "shelve", "unshelve", "resolve"];

const ALLOWED: Record<string, ActionName[]> = {
  active_unacked: ["acknowledge", "comment", "assign", "shelve", "resolve"],
  active_acked: ["comment", "assign", "shelve", "resolve"],
  cleared_unacked: ["acknowledge", "comment", "assign", "shelve", "resolve"],
  closed: ["comment"],
  shelved: ["comment", "assign", "unshelve", "resolve"],
  suppressed: ["comment", "assign"],
  out_of_service: ["comment", "assign"],
};

const ROLE_COVERS: Record<string, string[]> = {
  operator: ["operator"],
  responder: ["operator", "responder"],
  engineer: ["engineer"],
  admin: ["operator", "responder", "engineer", "admin"],
};

let actorName = "";

/** Who acts (for the feed entry of one's own actions). */
export function setActor(name: string): void {
  actorName = name;
}

export function mayAct(me: Me, alert: Alert, action: ActionName): boolean {
  if (!me.permissions.includes("alerts")) return false;
  if (!(ALLOWED[alert.state] ?? []).includes(action)) return false;
  if (action === "acknowledge" || action === "resolve") {
    const role = alert.ack_role ?? store.rule(alert.rule_id)?.ack_role ?? null;
    if (role !== null && !(ROLE_COVERS[me.role] ?? []).includes(role)) return false;
  }
  if (action === "resolve" && store.rule(alert.rule_id)?.resolve_manually === false) return false;
  return true;
}

export function mayAcknowledge(me: Me, alert: Alert): boolean {
  return isUnacked(alert.state) && mayAct(me, alert, "acknowledge");
}

export interface ActionInput {
  note?: string;
  assignee?: string;
  /** Shelve: until this epoch second. */
  until?: number;
}

export interface ActionResult {
  ok: boolean;
  message: string;
  alert: Alert | null;
}

function body(action: ActionName, alert: Alert, input: ActionInput): Record<string, unknown> {
  const version = alert.version;
  switch (action) {
    case "acknowledge":
    case "unshelve":
    case "resolve":
      return { version, note: input.note ?? "" };
    case "comment":
      return { version, note: input.note ?? "" };
    case "assign":
      return { version, assignee: input.assignee ?? "", note: input.note ?? "" };
    case "shelve":
      return {
        version,
        until: new Date((input.until ?? Date.now() / 1000 + 3600) * 1000).toISOString(),
        reason: input.note ?? "",
      };
  }
}

export function actionLabel(action: ActionName): string {
  return t(`action.${action}` as MessageKey);
}

/** Run one action; the store is updated with the result (or the current alert on 409). */
export async function runAction(action: ActionName, alert: Alert, input: ActionInput = {}): Promise<ActionResult> {
  try {
    const raw = await api<Record<string, unknown>>(
      "POST",
      `/api/v1/alerts/${encodeURIComponent(alert.id)}/${action}`,
      body(action, alert, input),
    );
    store.applyAlertFromRest(raw, action, actorName);
    return { ok: true, message: t("action.done", { action: actionLabel(action) }), alert: normalizeAlert(raw) };
  } catch (exc) {
    if (exc instanceof ApiError && exc.status === 409) {
      const current = exc.body?.["current"] as Record<string, unknown> | null | undefined;
      let now: Alert | null = null;
      if (current) {
        store.applyAlertFromRest(current, null);
        now = normalizeAlert(current);
      }
      const by =
        now?.acked_by && now.acked_at
          ? t("action.conflictBy", { name: now.acked_by, time: formatTime(now.acked_at) })
          : "";
      return {
        ok: false,
        message: t("action.conflict", { state: stateLabel((now?.state ?? alert.state) as AlertState), by }),
        alert: now,
      };
    }
    if (exc instanceof ApiError && exc.status === 403) {
      return { ok: false, message: t("action.forbidden", { message: exc.message }), alert: null };
    }
    const message = exc instanceof Error ? exc.message : String(exc);
    return { ok: false, message: t("action.failed", { message }), alert: null };
  }
}

/**
 * Ask for what an action needs (a note, an assignee, a shelve duration) in a
 * modal dialog; resolves with the input, or null when cancelled. Acknowledge
 * takes an optional note.
 */
export function askInput(action: ActionName, alert: Alert): Promise<ActionInput | null> {
  return new Promise((resolve) => {
    const noteRequired = action === "comment" || action === "resolve" || action === "shelve";
    const note = h("textarea", {
      id: "action-note",
      name: "note",
      rows: 3,
      maxlength: 2000,
      required: noteRequired,
    });
    const fields: HTMLElement[] = [];
    let assignee: HTMLInputElement | null = null;
    let duration: HTMLSelectElement | null = null;
    if (action === "assign") {
      assignee = h("input", { id: "action-assignee", name: "assignee", required: true, maxlength: 64, autocomplete: "off" });
      fields.push(h("label", { for: "action-assignee" }, t("action.assignee")), assignee);
    }
    if (action === "shelve") {
      duration = h(
        "select",
        { id: "action-duration", name: "duration" },
        ...[15, 60, 240, 480, 1440].map((m) =>
          h("option", { value: m }, m < 60 ? t("action.minutes", { n: m }) : t("action.hours", { n: m / 60 })),
        ),
      );
      duration.value = "60";
      fields.push(h("label", { for: "action-duration" }, t("action.shelveFor")), duration);
    }
    const noteLabel = action === "shelve" ? t("action.reason") : noteRequired ? t("action.noteRequired") : t("action.note");
    fields.push(h("label", { for: "action-note" }, noteLabel), note);
    const error = h("p", { class: "form-error", role: "alert" });
    const cancel = h("button", { type: "button", class: "btn" }, t("action.cancel"));
    const submit = h("button", { type: "submit", class: "btn btn-primary" }, actionLabel(action));
    const form = h(
      "form",
      { method: "dialog", class: "action-form" },
      h("h2", { id: "action-title" }, `${actionLabel(action)}: ${alert.message || alert.subject}`),
      ...fields,
      error,
      h("div", { class: "dialog-buttons" }, cancel, submit),
    );
    const dialog = h("dialog", { class: "action-dialog", "aria-labelledby": "action-title" }, form);
    document.body.appendChild(dialog);
    let settled = false;
    const finish = (value: ActionInput | null) => {
      if (settled) return;
      settled = true;
      dialog.close();
      dialog.remove();
      resolve(value);
    };
    cancel.addEventListener("click", () => finish(null));
    dialog.addEventListener("cancel", (e) => {
      e.preventDefault();
      finish(null);
    });
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const text = note.value.trim();
      if (noteRequired && !text) {
        error.textContent = noteLabel;
        note.focus();
        return;
      }
      const input: ActionInput = { note: text };
      if (assignee) {
        const who = assignee.value.trim();
        if (!who) {
          error.textContent = t("action.assignee");
          assignee.focus();
          return;
        }
        input.assignee = who;
      }
      if (duration) input.until = Date.now() / 1000 + Number(duration.value) * 60;
      finish(input);
    });
    dialog.showModal();
    (assignee ?? note).focus();
  });
}
