// The signed-in console: header (KPIs, connection state, REPLAY banner,
// language, mute, user), the current page, toasts, and the new-critical
// banner. A language change rebuilds the shell and the page (views keep
// their filters and map position in module state).

import { api, ApiError, logout, onUnauthorized, query, sessionEnded } from "./api";
import { setActor } from "./actions";
import { isMuted, onMuteChange, playCriticalTone, setMuted, unlockAudio } from "./audio";
import type { AppContext, View } from "./context";
import { h, replaceChildren, setAttr, setText } from "./dom";
import { formatCount, formatDuration, formatNumber, formatTime, setTimeZone } from "./format";
import { currentLanguage, onLanguageChange, setLanguage, t } from "./i18n";
import type { Language } from "./i18n";
import { LiveConnection } from "./live";
import type { ConnStatus } from "./live";
import { href, parseRoute } from "./router";
import type { Route } from "./router";
import { severityIcon, severityLabel } from "./severity";
import { settings, onSettingsChange } from "./settings";
import { store } from "./store";
import type { FeedEntry } from "./store";
import type { City, CityResponse, Me, Permission, RuleInfo } from "./types";
import { normalizeAlert, normalizeCity, SEVERITIES } from "./types";
import { AlertDetailView } from "./views/alertDetail";
import { AlertsView } from "./views/alerts";
import { DeviceView } from "./views/device";
import { OverviewView } from "./views/overview";
import { ReplayView } from "./views/replay";
import { openSettings } from "./views/settingsDialog";

export interface App {
  stop(): void;
}

/** Load the city and rules, connect, and show the console for `me`. */
export async function startApp(root: HTMLElement, me: Me, onSignedOut: () => void): Promise<App> {
  const city = await loadCity();
  if (city) {
    store.setCity(city);
    setTimeZone(city.timezone);
  }
  await loadRules();

  setActor(me.name);
  let stopped = false;
  let criticalEntry: FeedEntry | null = null;
  const live = new LiveConnection({
    staleAfterS: settings.staleAfterS,
    window: 4,
    sessionAlive: async () => {
      try {
        await api("GET", "/api/v1/auth/me", undefined, { quiet401: true });
        return true;
      } catch (exc) {
        if (exc instanceof ApiError && exc.status === 401) {
          sessionEnded();
          return false;
        }
        return true;
      }
    },
    onCriticalAlert: (entry) => {
      if (!entry) return;
      criticalEntry = entry;
      // No tone for the sandbox: a replay must never sound like a real emergency.
      if (live.currentSource() === "live") playCriticalTone();
      renderCritical();
    },
  });

  const toasts = h("div", { class: "toasts", role: "status", "aria-live": "polite" });
  const ctx: AppContext = {
    me,
    live,
    can: (p: Permission) => me.permissions.includes(p),
    toast(message, kind = "info") {
      const item = h("div", { class: `toast toast-${kind}` }, message);
      toasts.appendChild(item);
      window.setTimeout(() => item.remove(), kind === "error" ? 9000 : 5000);
    },
    followReplay(on: boolean) {
      live.switchSource(on ? "replay" : "live");
    },
  };

  // -- shell -------------------------------------------------------------------------

  let view: View | null = null;
  let route: Route = parseRoute(location.hash);
  const main = h("main", { id: "main", tabindex: -1 });
  const critical = h("div", { class: "critical-banner", role: "alert", hidden: true });
  const staleBanner = h("div", { class: "stale-banner", role: "alert", hidden: true });
  const replayBanner = h("div", { class: "replay-banner", hidden: true });
  const shell = h("div", { class: "app" });
  let header: ReturnType<typeof buildHeader>;

  function build(): void {
    header = buildHeader(ctx, city);
    replaceChildren(
      shell,
      h("a", { class: "skip-link", href: "#main", onclick: skipToMain }, t("app.skip")),
      replayBanner,
      header.el,
      staleBanner,
      critical,
      main,
      toasts,
    );
    renderReplayBanner();
    renderCritical();
    header.update();
    header.status(live.status());
    showRoute(true);
  }

  function skipToMain(event: Event): void {
    event.preventDefault();
    main.focus();
  }

  function showRoute(force = false): void {
    const next = parseRoute(location.hash);
    if (!force && view && JSON.stringify(next) === JSON.stringify(route)) return;
    route = next;
    view?.destroy();
    view = makeView(route, ctx);
    replaceChildren(main, view.el);
    header.setActive(route);
    updateTitle();
  }

  function renderReplayBanner(): void {
    const replay = store.source !== "live";
    shell.dataset["source"] = store.source;
    replayBanner.hidden = !replay;
    replaceChildren(
      replayBanner,
      h("strong", null, t("replay.banner")),
      store.runId ? h("span", { class: "run-id" }, ` · ${store.runId}`) : null,
      h("button", { type: "button", class: "btn btn-small", onclick: () => ctx.followReplay(false) }, t("replay.backToLive")),
    );
  }

  function renderCritical(): void {
    const entry = criticalEntry;
    const current = entry ? store.alerts.get(entry.alert.id) : undefined;
    if (!entry || !current || (current.state !== "active_unacked" && current.state !== "cleared_unacked")) {
      critical.hidden = true;
      replaceChildren(critical);
      return;
    }
    critical.hidden = false;
    replaceChildren(
      critical,
      severityIcon("critical", 22),
      h("strong", null, `${t("overview.newCritical")}: `),
      h("span", { class: "critical-message" }, current.message || current.subject),
      h("span", { class: "critical-time" }, ` ${formatTime(current.raised_at)}`),
      h("a", { class: "btn btn-small", href: href({ name: "alert", id: current.id }) }, t("overview.openAlert")),
      h("button", { type: "button", class: "btn btn-small", onclick: () => { criticalEntry = null; renderCritical(); } }, t("overview.dismiss")),
    );
  }

  function updateTitle(): void {
    const { unacked } = store.alertCounts();
    const prefix = store.source !== "live" ? `[${t("replay.bannerShort")}] ` : "";
    const count = unacked > 0 ? `(${unacked}) ` : "";
    const page = view?.title() ?? "";
    document.title = `${prefix}${count}${page ? `${page} · ` : ""}${city?.label ?? "cityops"} — cityops`;
  }

  function renderConn(status: ConnStatus): void {
    shell.dataset["conn"] = status.state;
    header.status(status);
    const asOf = formatTime(store.lastFrameWall || null);
    if (status.state === "stale") {
      staleBanner.hidden = false;
      setText(staleBanner, t("conn.overlayStale", { time: asOf }));
    } else if (status.state === "reconnecting" && store.lastFrameWall) {
      staleBanner.hidden = false;
      setText(staleBanner, t("conn.overlayReconnecting", { time: asOf }));
    } else {
      staleBanner.hidden = true;
    }
  }

  build();
  const unsubscribe = [
    live.onStatus((s) => {
      renderConn(s);
      if (s.state === "signed-out" && !stopped) onSignedOut();
    }),
    store.kpisChanged.on(() => {
      header.update();
      updateTitle();
    }),
    store.alertChanged.on(() => renderCritical()),
    store.reset.on(() => {
      renderCritical();
      updateTitle();
    }),
    store.sourceChanged.on(() => {
      renderReplayBanner();
      updateTitle();
    }),
    onLanguageChange(() => build()),
    onMuteChange(() => header.update()),
    onSettingsChange(() => live.setStaleAfter(settings.staleAfterS)),
    onUnauthorized(() => {
      if (!stopped) onSignedOut();
    }),
  ];
  const onHash = () => showRoute();
  window.addEventListener("hashchange", onHash);
  const ticker = window.setInterval(() => header.update(), 1000);
  const onGesture = () => unlockAudio();
  window.addEventListener("pointerdown", onGesture);
  window.addEventListener("keydown", onGesture);

  root.replaceChildren(shell);
  live.start("live");

  return {
    stop() {
      stopped = true;
      live.stop();
      view?.destroy();
      for (const fn of unsubscribe) fn();
      window.removeEventListener("hashchange", onHash);
      window.removeEventListener("pointerdown", onGesture);
      window.removeEventListener("keydown", onGesture);
      window.clearInterval(ticker);
    },
  };
}

function makeView(route: Route, ctx: AppContext): View {
  switch (route.name) {
    case "overview":
      return new OverviewView(ctx);
    case "alerts":
      return new AlertsView(ctx);
    case "alert":
      return new AlertDetailView(ctx, route.id);
    case "device":
      return new DeviceView(ctx, route.id);
    case "replay":
      if (ctx.can("engineering")) return new ReplayView(ctx);
      return messageView(t("nav.replay"), t("forbidden.body"));
    case "notfound":
      return messageView(t("notfound.title"), t("notfound.body", { path: route.path }));
  }
}

function messageView(title: string, body: string): View {
  const el = h("section", { class: "page page-message" }, h("h1", null, title), h("p", null, body));
  return { el, title: () => title, destroy: () => undefined };
}

async function loadCity(): Promise<City | null> {
  try {
    return normalizeCity(await api<CityResponse>("GET", "/api/v1/city"));
  } catch (exc) {
    // Without the city model the map draws the devices that have positions.
    console.warn("city model unavailable:", exc instanceof Error ? exc.message : exc);
    return null;
  }
}

async function loadRules(): Promise<void> {
  try {
    store.setRules(await api<RuleInfo[]>("GET", "/api/v1/rules"));
    return;
  } catch (exc) {
    if (!(exc instanceof ApiError) || exc.status !== 403) {
      console.warn("rules unavailable:", exc instanceof Error ? exc.message : exc);
      return;
    }
  }
  // A role without rule access: learn names and acknowledging roles from the
  // open alerts (REST carries them; the live feed does not).
  try {
    const page = await api<{ items: Record<string, unknown>[] }>("GET", `/api/v1/alerts${query({ open: true, limit: 500 })}`);
    const partial = new Map<string, RuleInfo>();
    for (const raw of page.items) {
      const a = normalizeAlert(raw);
      if (!partial.has(a.rule_id) && a.ack_role) {
        partial.set(a.rule_id, {
          id: a.rule_id,
          name: a.rule_name,
          severity: a.severity,
          subject: { domains: a.domain ? [a.domain] : [], districts: [], kinds: [], devices: [], channels: [] },
          when: "",
          clear_when: "",
          ack_role: a.ack_role,
          resolve_manually: true,
        });
      }
    }
    store.setRules([...partial.values()]);
  } catch {
    // the console still works; actions are checked by the server
  }
}

// -- header ----------------------------------------------------------------------------

function buildHeader(ctx: AppContext, city: City | null) {
  const navLinks: [Route, string][] = [
    [{ name: "overview" }, t("nav.overview")],
    [{ name: "alerts" }, t("nav.alerts")],
  ];
  if (ctx.can("engineering")) navLinks.push([{ name: "replay" }, t("nav.replay")]);
  const unackedBadge = h("span", { class: "nav-badge", "aria-hidden": "true" });
  const links = navLinks.map(([route, label]) =>
    h("a", { href: href(route), class: "nav-link", "data-route": route.name }, label, route.name === "alerts" ? unackedBadge : null),
  );
  const nav = h("nav", { class: "nav", "aria-label": t("nav.main") }, ...links);

  // KPIs
  const sevChips = SEVERITIES.map((sev) => {
    const count = h("span", { class: "kpi-count" }, "0");
    const chip = h("span", { class: `kpi-sev sev-${sev}`, "data-kpi": `open-${sev}` }, severityIcon(sev, 14), count, h("span", { class: "kpi-sev-label" }, severityLabel(sev)));
    return { sev, chip, count };
  });
  const unacked = h("span", { class: "kpi-value", "data-kpi": "unacked" }, "0");
  const online = h("span", { class: "kpi-value", "data-kpi": "online" }, "—");
  const offline = h("span", { class: "kpi-value", "data-kpi": "offline" }, "—");
  const stale = h("span", { class: "kpi-value", "data-kpi": "stale" }, "—");
  const rate = h("span", { class: "kpi-value", "data-kpi": "rate" }, "—");
  const freshness = h("span", { class: "kpi-value", "data-kpi": "freshness" }, "—");
  const kpis = h(
    "section",
    { class: "kpis", "aria-label": t("kpi.region") },
    h("div", { class: "kpi kpi-alerts" }, h("span", { class: "kpi-label" }, t("kpi.openAlerts")), h("span", { class: "kpi-sevs" }, ...sevChips.map((c) => c.chip))),
    h("div", { class: "kpi" }, h("span", { class: "kpi-label" }, t("kpi.unacked")), unacked),
    h(
      "div",
      { class: "kpi kpi-devices" },
      h("span", { class: "kpi-label" }, t("kpi.devices")),
      h("span", { class: "kpi-devs" },
        h("span", { class: "dev-online" }, "● ", online, ` ${t("kpi.online")}`),
        h("span", { class: "dev-offline" }, "✕ ", offline, ` ${t("kpi.offline")}`),
        h("span", { class: "dev-stale" }, "◌ ", stale, ` ${t("kpi.stale")}`),
      ),
    ),
    h("div", { class: "kpi" }, h("span", { class: "kpi-label" }, t("kpi.rate")), rate),
    h("div", { class: "kpi" }, h("span", { class: "kpi-label" }, t("kpi.freshness")), freshness),
  );

  // Connection state
  const connDot = h("span", { class: "conn-dot", "aria-hidden": "true" });
  const connText = h("span", { class: "conn-text" });
  const conn = h("div", { class: "conn", role: "status", "aria-live": "polite", "aria-label": t("conn.label"), "data-state": "connecting" }, connDot, connText);

  // Controls
  const sandbox = ctx.can("engineering")
    ? h("button", { type: "button", class: "btn btn-small btn-sandbox", "aria-pressed": "false" }, t("replay.follow"))
    : null;
  sandbox?.addEventListener("click", () => ctx.followReplay(store.source === "live"));
  const mute = h("button", { type: "button", class: "btn btn-small btn-mute" });
  mute.addEventListener("click", () => setMuted(!isMuted()));
  const lang = h(
    "select",
    { class: "lang-select", "aria-label": t("lang.label"), id: "lang-select" },
    h("option", { value: "en" }, "English"),
    h("option", { value: "ja" }, "日本語"),
  );
  lang.value = currentLanguage();
  lang.addEventListener("change", () => setLanguage(lang.value as Language));
  const gear = h("button", { type: "button", class: "btn btn-small btn-icon", "aria-label": t("settings.title"), title: t("settings.title") }, "⚙");
  gear.addEventListener("click", () => openSettings());
  const user = h("span", { class: "user" }, t("user.signedInAs", { name: ctx.me.name, role: t(`role.${ctx.me.role}`) }));
  const signOut = h("button", { type: "button", class: "btn btn-small" }, t("user.logout"));
  signOut.addEventListener("click", () => {
    void logout().finally(() => location.reload());
  });

  const el = h(
    "header",
    { class: "topbar" },
    h("div", { class: "brand" }, h("span", { class: "logo", "aria-hidden": "true" }, "◆"), h("span", { class: "brand-name" }, "cityops"), h("span", { class: "city-name" }, city?.label ?? "")),
    nav,
    kpis,
    h("div", { class: "controls" }, conn, sandbox, mute, lang, gear, user, signOut),
  );

  let lastStatus: ConnStatus | null = null;

  function update(): void {
    const counts = store.alertCounts();
    for (const c of sevChips) {
      const n = counts.bySeverity[c.sev] ?? 0;
      setText(c.count, formatCount(n));
      c.chip.classList.toggle("is-zero", n === 0);
      setAttr(c.chip, "aria-label", `${severityLabel(c.sev)}: ${n}`);
    }
    setText(unacked, formatCount(counts.unacked));
    unacked.classList.toggle("is-alarm", counts.unacked > 0);
    setText(unackedBadge, counts.unacked > 0 ? String(counts.unacked) : "");
    const k = store.kpis;
    // Counted from what the console holds (the snapshot and every presence and
    // staleness change since): the same picture as the map, at once. The
    // server's periodic figures (from the database) stand in before the snapshot.
    const devices = store.snapshotAt ? store.deviceCounts() : k?.devices;
    setText(online, devices ? formatCount(devices["online"] ?? 0) : "—");
    setText(offline, devices ? formatCount(devices["offline"] ?? 0) : "—");
    setText(stale, devices ? formatCount(devices["stale"] ?? 0) : "—");
    setText(rate, k ? formatNumber(k.readings_per_s, 1) : "—");
    tick();
    const muted = isMuted();
    replaceChildren(mute, speakerIcon(muted), muted ? t("sound.muted") : t("sound.on"));
    setAttr(mute, "aria-pressed", muted ? "true" : "false");
    setAttr(mute, "aria-label", muted ? `${t("sound.muted")} — ${t("sound.toggleUnmute")}` : `${t("sound.on")} — ${t("sound.toggleMute")}`);
    mute.dataset["muted"] = muted ? "1" : "0";
    if (sandbox) {
      const replay = store.source !== "live";
      setText(sandbox, replay ? t("replay.backToLive") : t("replay.follow"));
      setAttr(sandbox, "aria-pressed", replay ? "true" : "false");
    }
  }

  function tick(): void {
    const fresh = store.freshnessNow();
    setText(freshness, fresh === null ? t("kpi.freshnessNone") : formatDuration(fresh));
    freshness.classList.toggle("is-warn", fresh !== null && fresh > 120);
    if (lastStatus) status(lastStatus);
  }

  function status(s: ConnStatus): void {
    lastStatus = s;
    conn.dataset["state"] = s.state;
    conn.dataset["start"] = s.start ?? "";
    conn.dataset["starts"] = String(s.starts);
    let text: string;
    switch (s.state) {
      case "live":
        text = store.source === "live" ? t("conn.live") : t("conn.liveReplay");
        break;
      case "connecting":
        text = t("conn.connecting");
        break;
      case "stale":
        text = t("conn.stale", { seconds: Math.round(s.silentS) });
        break;
      case "reconnecting":
        text = s.retryAt
          ? t("conn.reconnectingIn", { seconds: Math.max(0, Math.ceil((s.retryAt - performance.now()) / 1000)), attempt: s.attempt })
          : t("conn.reconnecting");
        break;
      case "signed-out":
        text = t("conn.signedOut");
        break;
    }
    setText(connText, text);
    setText(connDot, s.state === "live" ? "●" : s.state === "stale" ? "⚠" : s.state === "signed-out" ? "✕" : "↻");
    setAttr(conn, "title", store.lastFrameWall ? t("conn.lastUpdate", { time: formatTime(store.lastFrameWall) }) : null);
  }

  function setActive(route: Route): void {
    const name = route.name === "alert" ? "alerts" : route.name;
    for (const link of links) {
      if (link.dataset["route"] === name) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
  }

  return { el, update, tick, status, setActive };
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** A speaker, crossed out when muted (SVG: no emoji font needed). */
function speakerIcon(muted: boolean): SVGSVGElement {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("width", "16");
  svg.setAttribute("height", "16");
  svg.setAttribute("viewBox", "0 0 16 16");
  svg.setAttribute("aria-hidden", "true");
  const body = document.createElementNS(SVG_NS, "path");
  body.setAttribute("d", "M2 6h3l4-3v10l-4-3H2z");
  body.setAttribute("fill", "currentColor");
  svg.appendChild(body);
  const mark = document.createElementNS(SVG_NS, "path");
  mark.setAttribute("d", muted ? "M11 5.5l4 5M15 5.5l-4 5" : "M11 5.5c1.2 1.4 1.2 3.6 0 5M13 4c2 2.2 2 5.8 0 8");
  mark.setAttribute("stroke", "currentColor");
  mark.setAttribute("stroke-width", "1.5");
  mark.setAttribute("fill", "none");
  svg.appendChild(mark);
  return svg;
}
