// The alerts table: filters, priority order, incidents that expand, actions,
// keyboard first, bulk acknowledge; virtualised (only the rows in view exist
// in the DOM), so a thousand open alerts scroll as smoothly as ten.
//
// Order: severity (critical first), then unacknowledged before acknowledged,
// then newest first. An incident (several alerts of one flood in a district)
// is one row, placed by its most urgent member; it expands into its alerts.

import { ACTIONS, actionLabel, askInput, mayAct, mayAcknowledge, runAction } from "../actions";
import type { ActionName } from "../actions";
import { api, mapLimit, query } from "../api";
import type { AppContext, View } from "../context";
import { h, isTyping, replaceChildren, setAttr, setText } from "../dom";
import { formatDateTime, formatDuration } from "../format";
import { t, tDynamic } from "../i18n";
import { href, navigate } from "../router";
import { severityBadge, severityRank, stateLabel } from "../severity";
import { store } from "../store";
import type { Alert, Severity } from "../types";
import { DOMAINS, isUnacked, normalizeAlert, OPEN_STATES, SEVERITIES } from "../types";

const ROW_H = 44;
const OVERSCAN = 8;

type AlertRow = { key: string; kind: "alert"; alert: Alert; depth: 0 | 1 };
type IncidentRow = {
  key: string;
  kind: "incident";
  id: string;
  district: string;
  members: Alert[];
  worst: Severity;
  unacked: number;
};
type Row = AlertRow | IncidentRow;

interface Filters {
  severity: string;
  state: string;
  domain: string;
  district: string;
  text: string;
}

/** Kept across page visits and language switches. */
const memory = {
  filters: { severity: "", state: "open", domain: "", district: "", text: "" } as Filters,
  selected: null as string | null,
  checked: new Set<string>(),
  expanded: new Set<string>(),
  scrollTop: 0,
};

function sortKey(a: Alert): [number, number, number] {
  return [severityRank(a.severity), isUnacked(a.state) ? 0 : 1, -a.raised_at];
}

function compareAlerts(a: Alert, b: Alert): number {
  const ka = sortKey(a);
  const kb = sortKey(b);
  for (let i = 0; i < 3; i++) if (ka[i]! !== kb[i]!) return ka[i]! - kb[i]!;
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

function matches(alert: Alert, f: Filters): boolean {
  if (f.severity && alert.severity !== f.severity) return false;
  if (f.state === "unacked" && !isUnacked(alert.state)) return false;
  if (f.state !== "open" && f.state !== "unacked" && f.state !== "closed" && alert.state !== f.state) return false;
  if (f.domain && alert.domain !== f.domain) return false;
  if (f.district && alert.district !== f.district) return false;
  if (f.text) {
    const needle = f.text.toLowerCase();
    const hay = `${alert.message} ${alert.rule_id} ${alert.rule_name} ${alert.subject} ${alert.device_id ?? ""} ${alert.district}`.toLowerCase();
    if (!hay.includes(needle)) return false;
  }
  return true;
}

export class AlertsView implements View {
  readonly el: HTMLElement;
  private rows: Row[] = [];
  private total = 0;
  private closed: Alert[] | null = null;
  private closedRequest = 0;
  private readonly scroller: HTMLElement;
  private readonly body: HTMLElement;
  private byKey = new Map<string, HTMLElement>();
  private readonly free: HTMLElement[] = [];
  private readonly count: HTMLElement;
  private readonly actionsBar: HTMLElement;
  private readonly bulkBar: HTMLElement;
  private readonly textInput: HTMLInputElement;
  private readonly empty: HTMLElement;
  private frame: number | null = null;
  private rebuildNeeded = true;
  private readonly unsubscribe: (() => void)[] = [];
  private readonly ageTimer: number;
  private busy = false;

  constructor(private readonly ctx: AppContext) {
    const f = memory.filters;
    const severity = this.select("filter-severity", t("alerts.filterSeverity"), [
      ["", t("alerts.any")],
      ...SEVERITIES.map((s): [string, string] => [s, t(`severity.${s}`)]),
    ], f.severity, (v) => (f.severity = v));
    const stateSel = this.select("filter-state", t("alerts.filterState"), [
      ["open", t("alerts.openStates")],
      ["unacked", t("alerts.unackedOnly")],
      ...OPEN_STATES.map((s): [string, string] => [s, stateLabel(s)]),
      ["closed", t("alerts.closedRecent")],
    ], f.state, (v) => (f.state = v));
    const domain = this.select("filter-domain", t("alerts.filterDomain"), [
      ["", t("alerts.any")],
      ...DOMAINS.map((d): [string, string] => [d, t(`domain.${d}`)]),
    ], f.domain, (v) => (f.domain = v));
    const districts = store.city?.districts.map((d): [string, string] => [d.name, d.label]) ?? [];
    const district = this.select("filter-district", t("alerts.filterDistrict"), [["", t("alerts.any")], ...districts], f.district, (v) => (f.district = v));
    this.textInput = h("input", {
      id: "filter-text",
      type: "search",
      placeholder: t("alerts.filterTextPlaceholder"),
      value: f.text,
      autocomplete: "off",
      "aria-keyshortcuts": "/",
    });
    this.textInput.addEventListener("input", () => {
      f.text = this.textInput.value.trim();
      this.filtersChanged();
    });
    const filters = h(
      "form",
      { class: "filters", role: "search", "aria-label": t("alerts.filters"), onsubmit: (e: Event) => e.preventDefault() },
      ...severity,
      ...stateSel,
      ...domain,
      ...district,
      h("label", { for: "filter-text" }, t("alerts.filterText")),
      this.textInput,
    );

    this.count = h("p", { class: "alerts-count", role: "status", "aria-live": "polite" });
    this.actionsBar = h("div", { class: "actions-bar", role: "toolbar", "aria-label": t("alert.title") });
    this.bulkBar = h("div", { class: "bulk-bar" });
    this.empty = h("p", { class: "grid-empty", hidden: true }, t("alerts.empty"));

    const headerRow = h(
      "div",
      { class: "grid-row grid-head", role: "row", "aria-rowindex": 1 },
      h("div", { class: "cell c-check", role: "columnheader" }, h("span", { class: "visually-hidden" }, t("alerts.col.select"))),
      h("div", { class: "cell c-sev", role: "columnheader" }, t("alerts.col.severity")),
      h("div", { class: "cell c-state", role: "columnheader" }, t("alerts.col.state")),
      h("div", { class: "cell c-msg", role: "columnheader" }, t("alerts.col.message")),
      h("div", { class: "cell c-district", role: "columnheader" }, t("alerts.col.district")),
      h("div", { class: "cell c-raised", role: "columnheader" }, t("alerts.col.raised")),
      h("div", { class: "cell c-age", role: "columnheader" }, t("alerts.col.age")),
      h("div", { class: "cell c-assignee", role: "columnheader" }, t("alerts.col.assignee")),
    );
    this.body = h("div", { class: "grid-body", role: "rowgroup" });
    this.scroller = h(
      "div",
      {
        class: "grid-scroll live-panel",
        role: "grid",
        tabindex: 0,
        "aria-label": t("alerts.title"),
        "aria-multiselectable": "true",
        "aria-describedby": "alerts-keys",
      },
      h("div", { role: "rowgroup", class: "grid-headgroup" }, headerRow),
      this.body,
    );
    this.scroller.addEventListener("scroll", () => {
      memory.scrollTop = this.scroller.scrollTop;
      this.schedule(false);
    });
    this.body.addEventListener("click", (e) => this.onClick(e));
    this.body.addEventListener("dblclick", (e) => {
      const row = (e.target as HTMLElement).closest<HTMLElement>(".grid-row");
      if (row?.dataset["alertId"]) navigate({ name: "alert", id: row.dataset["alertId"] });
    });

    this.el = h(
      "section",
      { class: "page page-alerts", "aria-labelledby": "alerts-title" },
      h("div", { class: "page-head" }, h("h1", { id: "alerts-title" }, t("alerts.title")), this.count),
      filters,
      h("div", { class: "bars" }, this.actionsBar, this.bulkBar),
      this.scroller,
      this.empty,
      h("p", { class: "keys-hint", id: "alerts-keys" }, t("alerts.keys")),
    );

    this.unsubscribe.push(
      store.alertChanged.on(() => this.schedule(true)),
      store.reset.on(() => this.schedule(true)),
    );
    const onKey = (e: KeyboardEvent) => this.onKey(e);
    document.addEventListener("keydown", onKey);
    this.unsubscribe.push(() => document.removeEventListener("keydown", onKey));
    this.ageTimer = window.setInterval(() => this.schedule(false), 5000);
    if (memory.filters.state === "closed") void this.loadClosed();
    this.schedule(true);
    requestAnimationFrame(() => {
      this.scroller.scrollTop = memory.scrollTop;
      this.scroller.focus({ preventScroll: true });
    });
  }

  title(): string {
    return t("alerts.title");
  }

  destroy(): void {
    for (const fn of this.unsubscribe) fn();
    window.clearInterval(this.ageTimer);
    if (this.frame !== null) cancelAnimationFrame(this.frame);
  }

  // -- filters -------------------------------------------------------------------------

  private select(
    id: string,
    label: string,
    options: [string, string][],
    value: string,
    set: (v: string) => void,
  ): HTMLElement[] {
    const sel = h("select", { id }, ...options.map(([v, text]) => h("option", { value: v }, text)));
    sel.value = value;
    sel.addEventListener("change", () => {
      set(sel.value);
      this.filtersChanged();
    });
    return [h("label", { for: id }, label), sel];
  }

  private filtersChanged(): void {
    if (memory.filters.state === "closed") void this.loadClosed();
    else this.closed = null;
    this.scroller.scrollTop = 0;
    this.schedule(true);
  }

  private async loadClosed(): Promise<void> {
    const request = ++this.closedRequest;
    const f = memory.filters;
    try {
      const page = await api<{ items: Record<string, unknown>[] }>(
        "GET",
        `/api/v1/alerts${query({
          state: ["closed"],
          severity: f.severity ? [f.severity] : null,
          domain: f.domain,
          district: f.district,
          text: f.text,
          source: store.source,
          limit: 200,
        })}`,
      );
      if (request !== this.closedRequest) return;
      this.closed = page.items.map(normalizeAlert);
    } catch (exc) {
      if (request !== this.closedRequest) return;
      this.closed = [];
      this.ctx.toast(t("action.failed", { message: exc instanceof Error ? exc.message : String(exc) }), "error");
    }
    this.schedule(true);
  }

  // -- rows ----------------------------------------------------------------------------

  private rebuild(): void {
    const f = memory.filters;
    let alerts: Alert[];
    if (f.state === "closed") {
      alerts = this.closed ?? [];
      this.total = alerts.length;
    } else {
      alerts = [...store.alerts.values()];
      this.total = alerts.length;
      alerts = alerts.filter((a) => matches(a, f));
    }
    alerts.sort(compareAlerts);
    const groups = new Map<string, Alert[]>();
    for (const a of alerts) {
      if (!a.incident_id) continue;
      const g = groups.get(a.incident_id);
      if (g) g.push(a);
      else groups.set(a.incident_id, [a]);
    }
    const rows: Row[] = [];
    const seen = new Set<string>();
    for (const a of alerts) {
      const group = a.incident_id ? groups.get(a.incident_id) : undefined;
      if (!group || group.length < 2) {
        rows.push({ key: `a:${a.id}`, kind: "alert", alert: a, depth: 0 });
        continue;
      }
      if (seen.has(a.incident_id!)) continue;
      seen.add(a.incident_id!);
      const id = a.incident_id!;
      rows.push({
        key: `i:${id}`,
        kind: "incident",
        id,
        district: a.district,
        members: group,
        worst: group[0]!.severity,
        unacked: group.filter((m) => isUnacked(m.state)).length,
      });
      if (memory.expanded.has(id)) {
        for (const m of group) rows.push({ key: `a:${m.id}`, kind: "alert", alert: m, depth: 1 });
      }
    }
    this.rows = rows;
    // Forget checked alerts that left the list.
    const present = new Set(alerts.map((a) => a.id));
    for (const id of [...memory.checked]) if (!present.has(id)) memory.checked.delete(id);
    if (memory.selected && !rows.some((r) => r.key === memory.selected)) {
      // The selected alert moved into a collapsed incident, or left: select its neighbour.
      const alertId = memory.selected.startsWith("a:") ? memory.selected.slice(2) : null;
      const holder = alertId ? rows.find((r) => r.kind === "incident" && r.members.some((m) => m.id === alertId)) : undefined;
      memory.selected = holder?.key ?? rows[0]?.key ?? null;
    }
    if (!memory.selected && rows.length) memory.selected = rows[0]!.key;
  }

  private schedule(rebuild: boolean): void {
    if (rebuild) this.rebuildNeeded = true;
    if (this.frame !== null) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = null;
      if (this.rebuildNeeded) {
        this.rebuildNeeded = false;
        this.rebuild();
      }
      this.render();
    });
  }

  private render(): void {
    const n = this.rows.length;
    this.body.style.height = `${n * ROW_H}px`;
    setAttr(this.scroller, "aria-rowcount", String(n + 1));
    const top = this.scroller.scrollTop;
    const height = this.scroller.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / ROW_H) - OVERSCAN);
    const last = Math.min(n, Math.ceil((top + height) / ROW_H) + OVERSCAN);
    const now = Date.now() / 1000;
    // Rows keep their element while they stay in view (scrolling moves them,
    // it does not rebuild them); rows leaving the view free theirs for rows
    // coming in.
    const next = new Map<string, HTMLElement>();
    const incoming: number[] = [];
    for (let i = first; i < last; i++) {
      const row = this.rows[i]!;
      const el = this.byKey.get(row.key);
      if (el) next.set(row.key, el);
      else incoming.push(i);
    }
    for (const [key, el] of this.byKey) {
      if (!next.has(key)) this.release(el);
    }
    for (const i of incoming) {
      const row = this.rows[i]!;
      let el = this.free.pop();
      if (!el) {
        el = h("div", { class: "grid-row", role: "row" });
        this.body.appendChild(el);
      }
      next.set(row.key, el);
    }
    this.byKey = next;
    for (let i = first; i < last; i++) {
      const row = this.rows[i]!;
      this.fillRow(this.byKey.get(row.key)!, row, i, now);
    }
    const selectedRow = this.rows.find((r) => r.key === memory.selected);
    setAttr(this.scroller, "aria-activedescendant", selectedRow ? rowId(selectedRow.key) : null);
    this.empty.hidden = n > 0;
    const f = memory.filters;
    const shownAlerts = this.rows.reduce((s, r) => s + (r.kind === "alert" && r.depth === 0 ? 1 : r.kind === "incident" ? r.members.length : 0), 0);
    setText(
      this.count,
      f.state === "closed" ? t("alerts.countClosed", { shown: shownAlerts }) : t("alerts.count", { shown: shownAlerts, total: this.total }),
    );
    this.renderActions(selectedRow);
    this.renderBulk();
  }

  /** An unused row forgets its alert (no stale copy for queries or assistive tech). */
  private release(el: HTMLElement): void {
    el.hidden = true;
    el.className = "grid-row";
    el.removeAttribute("id");
    el.removeAttribute("aria-selected");
    el.removeAttribute("aria-expanded");
    for (const key of Object.keys(el.dataset)) delete el.dataset[key];
    el.textContent = "";
    this.free.push(el);
  }

  private fillRow(el: HTMLElement, row: Row, index: number, now: number): void {
    el.hidden = false;
    el.style.transform = `translateY(${index * ROW_H}px)`;
    const selected = row.key === memory.selected;
    const signature = row.kind === "alert"
      ? `${row.key}|${row.alert.version}|${row.alert.state}|${selected}|${memory.checked.has(row.alert.id)}|${Math.floor((now - row.alert.raised_at) / 60)}|${row.depth}`
      : `${row.key}|${row.members.map((m) => m.version).join(",")}|${selected}|${memory.expanded.has(row.id)}`;
    el.id = rowId(row.key);
    setAttr(el, "aria-rowindex", String(index + 2));
    setAttr(el, "aria-selected", selected ? "true" : "false");
    el.classList.toggle("is-selected", selected);
    if (el.dataset["sig"] === signature) return;
    el.dataset["sig"] = signature;
    el.dataset["key"] = row.key;
    if (row.kind === "incident") {
      delete el.dataset["alertId"];
      el.dataset["incident"] = row.id;
      el.className = `grid-row incident-row sev-${row.worst}${selected ? " is-selected" : ""}`;
      const open = memory.expanded.has(row.id);
      setAttr(el, "aria-expanded", open ? "true" : "false");
      replaceChildren(
        el,
        h("div", { class: "cell c-check", role: "gridcell" },
          h("button", {
            type: "button",
            class: "btn-expand",
            "data-expand": row.id,
            "aria-expanded": open ? "true" : "false",
            "aria-label": open ? t("alerts.collapse") : t("alerts.expand"),
          }, open ? "▾" : "▸"),
        ),
        h("div", { class: "cell c-sev", role: "gridcell" }, severityBadge(row.worst)),
        h("div", { class: "cell c-state", role: "gridcell" }, row.unacked ? `${row.unacked} ${t("kpi.unacked")}` : stateLabel("active_acked")),
        h("div", { class: "cell c-msg", role: "gridcell" }, h("strong", null, t("alerts.incident", { district: districtLabel(row.district), count: row.members.length }))),
        h("div", { class: "cell c-district", role: "gridcell" }, districtLabel(row.district)),
        h("div", { class: "cell c-raised", role: "gridcell" }, formatDateTime(Math.min(...row.members.map((m) => m.raised_at)))),
        h("div", { class: "cell c-age", role: "gridcell" }, formatDuration(now - Math.min(...row.members.map((m) => m.raised_at)))),
        h("div", { class: "cell c-assignee", role: "gridcell" }),
      );
      return;
    }
    const a = row.alert;
    removeAttr(el, "aria-expanded");
    delete el.dataset["incident"];
    el.dataset["alertId"] = a.id;
    el.dataset["state"] = a.state;
    el.dataset["severity"] = a.severity;
    el.className = `grid-row alert-row sev-${a.severity} state-${a.state}${row.depth ? " is-member" : ""}${selected ? " is-selected" : ""}`;
    const canCheck = mayAcknowledge(this.ctx.me, a);
    const check = canCheck
      ? h("input", {
          type: "checkbox",
          class: "row-check",
          "data-check": a.id,
          "aria-label": `${t("alerts.col.select")}: ${a.message || a.subject}`,
          checked: memory.checked.has(a.id),
          tabindex: -1,
        })
      : null;
    replaceChildren(
      el,
      h("div", { class: "cell c-check", role: "gridcell" }, check),
      h("div", { class: "cell c-sev", role: "gridcell" }, severityBadge(a.severity)),
      h("div", { class: "cell c-state", role: "gridcell" },
        h("span", { class: `state-label state-${a.state}` }, stateLabel(a.state)),
        a.acked_by ? h("span", { class: "sub" }, a.acked_by) : null,
      ),
      h("div", { class: "cell c-msg", role: "gridcell" },
        h("a", { href: href({ name: "alert", id: a.id }), class: "alert-link", tabindex: -1 }, a.message || a.subject),
        h("span", { class: "sub" }, [a.rule_name || a.rule_id, a.device_id].filter(Boolean).join(" · ")),
      ),
      h("div", { class: "cell c-district", role: "gridcell" }, districtLabel(a.district)),
      h("div", { class: "cell c-raised", role: "gridcell" }, formatDateTime(a.raised_at)),
      h("div", { class: "cell c-age", role: "gridcell" }, formatDuration(now - a.raised_at)),
      h("div", { class: "cell c-assignee", role: "gridcell" }, a.assignee ?? ""),
    );
  }

  private selectedAlert(): Alert | null {
    const row = this.rows.find((r) => r.key === memory.selected);
    return row?.kind === "alert" ? row.alert : null;
  }

  private renderActions(row: Row | undefined): void {
    const alert = row?.kind === "alert" ? row.alert : null;
    const offered = alert ? ACTIONS.filter((action) => mayAct(this.ctx.me, alert, action)) : [];
    const signature = `${alert?.id ?? ""}|${alert?.version ?? ""}|${offered.join(",")}|${this.busy}`;
    if (this.actionsBar.dataset["sig"] === signature) return;
    this.actionsBar.dataset["sig"] = signature;
    if (!alert) {
      replaceChildren(this.actionsBar);
      return;
    }
    const keys: Partial<Record<ActionName, string>> = { acknowledge: "a", comment: "c", shelve: "s", resolve: "r", assign: "g" };
    replaceChildren(
      this.actionsBar,
      h("span", { class: "actions-target" }, alert.message || alert.subject),
      ...offered.map((action) =>
        h(
          "button",
          {
            type: "button",
            class: `btn btn-small btn-action${action === "acknowledge" ? " btn-primary" : ""}`,
            "data-action": action,
            disabled: this.busy,
            "aria-keyshortcuts": keys[action] ?? null,
            onclick: () => void this.act(action, alert),
          },
          actionLabel(action),
          keys[action] ? h("kbd", null, keys[action]) : null,
        ),
      ),
    );
  }

  private renderBulk(): void {
    if (!this.ctx.can("alerts")) {
      replaceChildren(this.bulkBar);
      return;
    }
    const n = memory.checked.size;
    const signature = `${n}|${this.busy}`;
    if (this.bulkBar.dataset["sig"] === signature) return;
    this.bulkBar.dataset["sig"] = signature;
    replaceChildren(
      this.bulkBar,
      h("button", { type: "button", class: "btn btn-small", "data-bulk": "select-all", onclick: () => this.selectAllAckable() }, t("alerts.selectAll")),
      n
        ? h("button", { type: "button", class: "btn btn-small", "data-bulk": "clear", onclick: () => { memory.checked.clear(); this.schedule(false); } }, t("alerts.clearSelection"))
        : null,
      h("button", {
        type: "button",
        class: "btn btn-small btn-primary",
        "data-bulk": "acknowledge",
        disabled: n === 0 || this.busy,
        "aria-keyshortcuts": "Shift+A",
        onclick: () => void this.bulkAcknowledge(),
      }, t("alerts.bulkAck", { count: n })),
    );
  }

  private selectAllAckable(): void {
    for (const row of this.rows) {
      if (row.kind === "alert" && mayAcknowledge(this.ctx.me, row.alert)) memory.checked.add(row.alert.id);
      if (row.kind === "incident") for (const m of row.members) if (mayAcknowledge(this.ctx.me, m)) memory.checked.add(m.id);
    }
    this.schedule(false);
  }

  // -- actions -------------------------------------------------------------------------

  private async act(action: ActionName, alert: Alert, quick = false): Promise<void> {
    if (this.busy) return;
    let input = {};
    if (!quick && action !== "acknowledge" && action !== "unshelve") {
      const asked = await askInput(action, alert);
      if (!asked) return;
      input = asked;
    }
    this.busy = true;
    this.schedule(false);
    const result = await runAction(action, store.alerts.get(alert.id) ?? alert, input);
    this.busy = false;
    this.ctx.toast(result.message, result.ok ? "success" : "error");
    this.schedule(true);
    this.scroller.focus({ preventScroll: true });
  }

  private async bulkAcknowledge(): Promise<void> {
    if (this.busy) return;
    const targets = [...memory.checked]
      .map((id) => store.alerts.get(id))
      .filter((a): a is Alert => a !== undefined && mayAcknowledge(this.ctx.me, a));
    if (!targets.length) return;
    this.busy = true;
    this.schedule(false);
    const results = await mapLimit(targets, 4, (a) => runAction("acknowledge", a));
    this.busy = false;
    const ok = results.filter((r) => r.ok).length;
    memory.checked.clear();
    this.ctx.toast(t("alerts.bulkDone", { ok, failed: results.length - ok }), ok === results.length ? "success" : "error");
    this.schedule(true);
  }

  // -- input ---------------------------------------------------------------------------

  private onClick(event: Event): void {
    const target = event.target as HTMLElement;
    const rowEl = target.closest<HTMLElement>(".grid-row");
    if (!rowEl) return;
    const key = rowEl.dataset["key"];
    const expand = target.closest<HTMLElement>("[data-expand]")?.dataset["expand"];
    if (expand) {
      this.toggleIncident(expand);
      memory.selected = key ?? memory.selected;
      return;
    }
    const check = target.closest<HTMLInputElement>("[data-check]");
    if (check) {
      const id = check.dataset["check"]!;
      if (check.checked) memory.checked.add(id);
      else memory.checked.delete(id);
    }
    if (target.closest("a.alert-link")) return; // the link navigates
    if (key) memory.selected = key;
    this.schedule(false);
    this.scroller.focus({ preventScroll: true });
  }

  private toggleIncident(id: string): void {
    if (memory.expanded.has(id)) memory.expanded.delete(id);
    else memory.expanded.add(id);
    this.schedule(true);
  }

  private move(delta: number): void {
    if (!this.rows.length) return;
    const i = this.rows.findIndex((r) => r.key === memory.selected);
    const next = Math.max(0, Math.min(this.rows.length - 1, (i < 0 ? 0 : i) + delta));
    memory.selected = this.rows[next]!.key;
    const top = next * ROW_H;
    const view = this.scroller.clientHeight - ROW_H; // minus the sticky header
    if (top < this.scroller.scrollTop) this.scroller.scrollTop = top;
    else if (top + ROW_H > this.scroller.scrollTop + view) this.scroller.scrollTop = top + ROW_H - view;
    this.schedule(false);
  }

  private onKey(event: KeyboardEvent): void {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (document.querySelector("dialog[open]")) return;
    if (isTyping(event)) {
      if (event.key === "Escape" && event.target === this.textInput) {
        this.textInput.blur();
        this.scroller.focus({ preventScroll: true });
      }
      return;
    }
    const inGrid = this.scroller.contains(document.activeElement) || document.activeElement === document.body;
    const row = this.rows.find((r) => r.key === memory.selected);
    const alert = this.selectedAlert();
    let handled = true;
    switch (event.key) {
      case "/":
        this.textInput.focus();
        this.textInput.select();
        break;
      case "j":
        this.move(1);
        break;
      case "k":
        this.move(-1);
        break;
      case "ArrowDown":
        if (inGrid) this.move(1);
        else handled = false;
        break;
      case "ArrowUp":
        if (inGrid) this.move(-1);
        else handled = false;
        break;
      case "PageDown":
        if (inGrid) this.move(10);
        else handled = false;
        break;
      case "PageUp":
        if (inGrid) this.move(-10);
        else handled = false;
        break;
      case "Home":
        if (inGrid) this.move(-this.rows.length);
        else handled = false;
        break;
      case "End":
        if (inGrid) this.move(this.rows.length);
        else handled = false;
        break;
      case "Enter":
      case "o":
        if (!inGrid && event.key === "Enter") handled = false;
        else if (row?.kind === "incident") this.toggleIncident(row.id);
        else if (alert) navigate({ name: "alert", id: alert.id });
        break;
      case " ":
        if (row?.kind === "incident" && inGrid) this.toggleIncident(row.id);
        else if (alert && inGrid && mayAcknowledge(this.ctx.me, alert)) this.toggleCheck(alert.id);
        else handled = false;
        break;
      case "x":
        if (alert && mayAcknowledge(this.ctx.me, alert)) this.toggleCheck(alert.id);
        break;
      case "a":
        if (alert && mayAct(this.ctx.me, alert, "acknowledge")) void this.act("acknowledge", alert, true);
        break;
      case "A":
        if (memory.checked.size) void this.bulkAcknowledge();
        break;
      case "c":
        if (alert && mayAct(this.ctx.me, alert, "comment")) void this.act("comment", alert);
        break;
      case "s":
        if (alert && mayAct(this.ctx.me, alert, "shelve")) void this.act("shelve", alert);
        break;
      case "r":
        if (alert && mayAct(this.ctx.me, alert, "resolve")) void this.act("resolve", alert);
        break;
      case "g":
        if (alert && mayAct(this.ctx.me, alert, "assign")) void this.act("assign", alert);
        break;
      case "Escape":
        if (memory.checked.size) {
          memory.checked.clear();
          this.schedule(false);
        } else handled = false;
        break;
      default:
        handled = false;
    }
    if (handled) event.preventDefault();
  }

  private toggleCheck(id: string): void {
    if (memory.checked.has(id)) memory.checked.delete(id);
    else memory.checked.add(id);
    this.schedule(false);
  }
}

function rowId(key: string): string {
  return `row-${key.replace(/[^a-zA-Z0-9_-]/g, "_")}`;
}

function removeAttr(el: Element, name: string): void {
  if (el.hasAttribute(name)) el.removeAttribute(name);
}

export function districtLabel(name: string): string {
  return store.city?.districts.find((d) => d.name === name)?.label ?? name;
}

/** For other views: the label of a domain. */
export function domainLabel(domain: string | null): string {
  return domain ? tDynamic(`domain.${domain}`, domain) : "";
}
