"""Console benchmark: 10,000 devices and 1,000 open alerts in headless Chromium.

Run: ``.venv/bin/python -m bench.console [--minutes 2]`` (about
``2 * minutes + 1`` minutes). Needs the built console (``npm run build`` in
``console/``) and Debian's Chromium (``/usr/bin/chromium``); no broker, no
database.

* A server child process serves the built console and a stand-in of the API
  it needs: the city (Minamikawa scaled to ``--devices`` devices, 104
  districts), rules and alerts lists (empty), a signed-in engineer, and the
  real live websocket: :func:`control_api.live.serve_live` over a
  :class:`control_api.live.LiveHub`, with a snapshot of every device (online,
  with a position and one series) and ``--alerts`` open alerts. A feeder
  hands the hub ``--rate`` readings per second (a batch every 100 ms, random
  series), plus ``--events`` alert events and as many presence changes per
  second, so the map has something to redraw.
* The console runs in headless Chromium twice, with the same load: with its
  canvas map, then with the baseline, naive DOM markers (one absolutely
  positioned element per device, restyled on every change, its tooltip set
  on every reading: ``mapRenderer: "dom"``).

Printed per renderer:

* first complete render (median of three fresh page loads): milliseconds
  from navigation start to the snapshot applied (``cityops:snapshot``
  mark), to the first map frame with every device drawn
  (``cityops:map-complete``), and to the next frame's start, once that frame
  was produced (``cityops:map-painted``; the DOM renderer's style, layout
  and paint of every marker fall in between);
* frame budget while updates arrive, idle and while the map is dragged
  (synthetic pointer events, one move per frame): animation-frame
  intervals (p50/p95/p99/max), the share of frames over 25 ms (a frame
  missed at 60 Hz) and over 50 ms, long tasks and their blocking time;
* the alerts table with the open alerts: time to its first row, and frame
  intervals while it scrolls from top to bottom (canvas run only);
* memory after ``--minutes`` under load: JS heap used (CDP
  ``Performance.getMetrics`` and ``performance.memory``), DOM nodes, event
  listeners, at the start and the end, and the heap's peak.

The machine is shared (2 cores): figures move with its load.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import random
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "console" / "dist"
CHROMIUM = Path(os.environ.get("CITYOPS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--enable-precise-memory-info",
]
SAMPLE_S = 10.0
LOADS = 3

# -- the server (child process) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    """What the server offers: the city's size, the open alerts, the update rates."""

    devices: int
    alerts: int
    rate: int
    events: int
    seed: int


def _serve(port: int, load: Load) -> None:
    import asyncio  # noqa: PLC0415 - the child's own imports

    import uvicorn  # noqa: PLC0415
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.requests import Request  # noqa: PLC0415
    from starlette.responses import JSONResponse  # noqa: PLC0415
    from starlette.routing import Mount, Route, WebSocketRoute  # noqa: PLC0415
    from starlette.staticfiles import StaticFiles  # noqa: PLC0415
    from starlette.websockets import WebSocket  # noqa: PLC0415

    from control_api.live import LiveHub  # noqa: PLC0415
    from control_api.live_ws import serve_live  # noqa: PLC0415
    from control_api.snapshot import (  # noqa: PLC0415
        DeviceState,
        Kpis,
        SeriesValue,
        Snapshot,
        alert_kpis,
        device_kpis,
    )
    from ingest import CommittedBatch, DeviceRef, Presence, Reading  # noqa: PLC0415
    from simulators import load_city, scale_city  # noqa: PLC0415

    devices, alerts, rate, events = load.devices, load.alerts, load.rate, load.events
    rng = random.Random(load.seed)
    city = scale_city(load_city("minamikawa"), devices)
    now = time.time()
    refs = [DeviceRef(d.domain, d.district, d.id) for d in city.devices]
    channels = {d.id: city.kinds[d.kind].channels[0].name for d in city.devices}
    states = tuple(
        DeviceState(
            id=d.id, domain=d.domain, district=d.district, kind=d.kind, name=None,
            lat=d.lat, lon=d.lon, presence="online", session=1, stale_since=None,
            out_of_service=False,
            series={channels[d.id]: SeriesValue(ts=now, value=1.0, state=None, unit=None)},
        )
        for d in city.devices
    )  # fmt: skip
    severities = ("critical", "major", "minor", "warning")
    open_alerts: dict[str, dict[str, Any]] = {}
    for i, d in enumerate(rng.sample(list(city.devices), alerts)):
        alert_id = f"bench-{i:05d}"
        open_alerts[alert_id] = {
            "id": alert_id, "rule_id": "bench-rule", "subject": d.id,
            "severity": severities[min(3, int(rng.random() ** 0.5 * 4))],
            "state": "active_unacked", "version": 1, "message": f"Bench alert on {d.id}",
            "raised_at": now - rng.random() * 3600, "updated_at": now, "active": True,
            "acked": False, "occurrences": 1, "value": 1.0, "device_id": d.id,
            "channel": channels[d.id], "district": d.district, "acked_by": None,
            "acked_at": None, "cleared_at": None, "closed_at": None, "unacked_since": now,
            "assignee": None, "shelved_until": None, "shelve_reason": None,
            "escalation_level": 0, "chattering": False, "incident_id": None, "source": "live",
        }  # fmt: skip
    by_severity, total, unacked = alert_kpis(open_alerts.values())
    kpis = Kpis(
        alerts_open=by_severity, alerts_open_total=total, alerts_unacked=unacked,
        devices=device_kpis(states), readings_per_s=float(rate), freshness_s=0.0, at=now,
    )  # fmt: skip
    snapshot = Snapshot(
        source="live", taken_at=now, devices=states, alerts=tuple(open_alerts.values()), kpis=kpis
    )
    hub = LiveHub()
    lats = [p[0] for d in city.districts for p in d.polygon]
    lons = [p[1] for d in city.districts for p in d.polygon]
    city_body = orjson.dumps(
        {
            "name": city.name, "label": city.label, "utc_offset_h": city.utc_offset_h,
            "bounds": [min(lats), min(lons), max(lats), max(lons)],
            "districts": [
                {"name": d.name, "label": d.label, "use": d.use, "polygon": list(d.polygon)}
                for d in city.districts
            ],
            "devices": len(city.devices),
        }
    )  # fmt: skip
    me = {
        "name": "bench", "role": "engineer", "via": "session",
        "permissions": ["alerts", "engineering", "view"], "csrf_token": "bench",
    }  # fmt: skip

    async def feed() -> None:
        """``rate`` readings/s in 10 batches, ``events`` alert events and presence changes/s."""
        versions = dict.fromkeys(open_alerts, 1)
        ids = list(open_alerts)
        sessions = [1] * len(refs)
        per_batch = max(1, rate // 10)
        tick = 0
        while True:
            started = time.time()
            readings = tuple(
                Reading(ref, channels[ref.device_id], started, rng.random() * 100, None, None)
                for ref in rng.sample(refs, per_batch)
            )
            presences: list[Presence] = []
            if tick % 10 == 0:
                for _ in range(events):
                    i = rng.randrange(len(refs))
                    sessions[i] += 1
                    presences.append(
                        Presence(
                            refs[i], "offline" if rng.random() < 0.5 else "online",
                            sessions[i], started,
                        )
                    )  # fmt: skip
                for _ in range(events):
                    alert_id = rng.choice(ids)
                    versions[alert_id] += 1
                    alert = dict(open_alerts[alert_id])
                    alert["version"] = versions[alert_id]
                    alert["severity"] = rng.choice(severities)
                    event = {"alert_id": alert_id, "version": versions[alert_id],
                             "action": "comment", "from_state": "active_unacked",
                             "to_state": "active_unacked", "actor": "bench", "at": started,
                             "note": "", "notify": None}  # fmt: skip
                    hub.on_alert_event(alert, event)
            hub.on_batch(
                CommittedBatch(
                    readings=readings, presences=tuple(presences), dead_letters=(),
                    committed_at=started, source="live",
                )
            )  # fmt: skip
            tick += 1
            await asyncio.sleep(max(0.0, 0.1 - (time.time() - started)))

    async def snapshot_source() -> Snapshot:
        return snapshot

    async def command(_: dict[str, Any]) -> dict[str, Any]:
        return {"ok": False, "error": "the benchmark takes no commands"}

    async def live(websocket: WebSocket) -> None:
        await serve_live(
            websocket, hub, user="bench", snapshot_source=snapshot_source, on_command=command
        )

    async def me_route(_: Request) -> JSONResponse:
        return JSONResponse(me)

    async def city_route(_: Request) -> JSONResponse:
        return JSONResponse(orjson.loads(city_body))

    async def empty_list(_: Request) -> JSONResponse:
        return JSONResponse([])

    async def empty_page(_: Request) -> JSONResponse:
        return JSONResponse({"items": [], "next_cursor": None})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> Any:
        task = asyncio.create_task(feed())
        try:
            yield
        finally:
            task.cancel()

    app = Starlette(
        routes=[
            Route("/api/v1/auth/me", me_route),
            Route("/api/v1/city", city_route),
            Route("/api/v1/rules", empty_list),
            Route("/api/v1/alerts", empty_page),
            WebSocketRoute("/api/v1/live", live),
            Mount("/", StaticFiles(directory=DIST, html=True)),
        ],
        lifespan=lifespan,
    )
    uvicorn.run(
        app, host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio",
        ws_per_message_deflate=False,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(args: argparse.Namespace) -> Iterator[str]:
    port = _free_port()
    ctx = mp.get_context("spawn")
    proc = ctx.Process(
        target=_serve,
        args=(port, Load(args.devices, args.alerts, args.rate, args.events, args.seed)),
        daemon=True,
    )
    proc.start()
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            break
        if time.monotonic() > deadline or not proc.is_alive():
            msg = "the benchmark server did not start"
            raise RuntimeError(msg)
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.join(10)


# -- the browser ---------------------------------------------------------------------------

PANNER = """
(durationMs) => {
  // A continuous drag, one move per frame: the map redraws every frame.
  const c = document.querySelector(".map-canvas");
  const r = c.getBoundingClientRect();
  const x0 = r.left + r.width / 2, y0 = r.top + r.height / 2;
  const opts = (x, y) => ({ clientX: x, clientY: y, pointerId: 7, bubbles: true, isPrimary: true });
  c.dispatchEvent(new PointerEvent("pointerdown", opts(x0, y0)));
  const t0 = performance.now();
  const move = (now) => {
    const t = (now - t0) / 1000;
    const x = x0 + 150 * Math.sin(t * 2), y = y0 + 80 * Math.cos(t * 3);
    c.dispatchEvent(new PointerEvent("pointermove", opts(x, y)));
    if (now - t0 < durationMs) requestAnimationFrame(move);
    else c.dispatchEvent(new PointerEvent("pointerup", opts(x0, y0)));
  };
  requestAnimationFrame(move);
}
"""

SCROLLER = """
(() => {
  // The alerts table from its first row to its last in 5 s, a step per frame.
  const g = document.querySelector(".grid-scroll");
  const t0 = performance.now();
  const tick = (now) => {
    g.scrollTop = (g.scrollHeight - g.clientHeight) * Math.min(1, (now - t0) / 5000);
    if (now - t0 < 5000) requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
})()
"""

FRAME_SAMPLER = """
(durationMs) => new Promise((resolve) => {
  const intervals = [];
  let longCount = 0, blocking = 0;
  const obs = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) { longCount++; blocking += Math.max(0, e.duration - 50); }
  });
  try { obs.observe({ type: "longtask" }); } catch (e) {}
  const panel = document.querySelector(".map-panel");
  const renders0 = Number(panel?.dataset.renders ?? 0);
  const renderMs0 = Number(panel?.dataset.renderMs ?? 0);
  let last = performance.now();
  const end = last + durationMs;
  function step(now) {
    intervals.push(now - last);
    last = now;
    if (now < end) requestAnimationFrame(step);
    else {
      obs.disconnect();
      const renders = Number(panel?.dataset.renders ?? 0) - renders0;
      const renderMs = Number(panel?.dataset.renderMs ?? 0) - renderMs0;
      resolve({ intervals, longCount, blocking, renders, renderMs });
    }
  }
  requestAnimationFrame(step);
})
"""


def _frames(sample: dict[str, Any]) -> dict[str, float]:
    intervals = sorted(float(x) for x in sample["intervals"][1:])
    if not intervals:
        return {}
    q = statistics.quantiles(intervals, n=100, method="inclusive")
    return {
        "frames": len(intervals),
        "p50_ms": q[49],
        "p95_ms": q[94],
        "p99_ms": q[98],
        "max_ms": intervals[-1],
        "over_25ms_pct": 100 * sum(x > 25 for x in intervals) / len(intervals),
        "over_50ms_pct": 100 * sum(x > 50 for x in intervals) / len(intervals),
        "long_tasks": float(sample["longCount"]),
        "blocking_ms": float(sample["blocking"]),
        "map_renders": float(sample.get("renders", 0)),
        "render_ms_avg": float(sample.get("renderMs", 0))
        / max(1.0, float(sample.get("renders", 0))),
    }


def _metrics(cdp: Any, page: Any) -> dict[str, float]:
    raw = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    heap = page.evaluate("performance.memory ? performance.memory.usedJSHeapSize : null")
    return {
        "js_heap_mb": raw.get("JSHeapUsedSize", 0) / 2**20,
        "perf_memory_mb": (heap or 0) / 2**20,
        "dom_nodes": raw.get("Nodes", 0),
        "listeners": raw.get("JSEventListeners", 0),
    }


def _measure(base: str, renderer: str, args: argparse.Namespace) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    out: dict[str, Any] = {"renderer": renderer}
    settings = orjson.dumps({"mapRenderer": renderer, "staleAfterS": 30}).decode()
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as _:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 900}, locale="en-US")
        context.add_init_script(
            "localStorage.setItem('cityops.session', '1');"
            f"localStorage.setItem('cityops.settings', {settings!r});"
            "localStorage.setItem('cityops.muted', '1');"
        )
        loads = []
        for _ in range(LOADS):
            # A fresh page each time; the median of the loads is reported.
            page = context.new_page()
            page.goto(f"{base}/#/")
            page.wait_for_selector(".map-panel[data-complete='1']", timeout=180_000)
            page.wait_for_function("performance.getEntriesByName('cityops:map-painted').length > 0")
            loads.append(
                page.evaluate(
                    "['cityops:snapshot', 'cityops:map-complete', 'cityops:map-painted'].map("
                    "n => performance.getEntriesByName(n)[0].startTime)"
                )
            )
            page.close()
        out["snapshot_ms"], out["first_render_ms"], out["first_paint_ms"] = (
            statistics.median(load[i] for load in loads) for i in range(3)
        )
        page = context.new_page()
        cdp = context.new_cdp_session(page)
        cdp.send("Performance.enable")
        page.goto(f"{base}/#/")
        page.wait_for_selector(".map-panel[data-complete='1']", timeout=180_000)
        out["devices_drawn"] = int(page.get_attribute(".map-panel", "data-devices") or 0)
        page.wait_for_timeout(3000)  # the first frames of deltas after the snapshot

        out["idle"] = _frames(page.evaluate(FRAME_SAMPLER, SAMPLE_S * 1000))

        # Not awaited here: the sampler runs while the drag goes on.
        page.evaluate(f"() => {{ window.__pan = ({FRAME_SAMPLER})({SAMPLE_S * 1000}); }}")
        page.evaluate(f"({PANNER})({SAMPLE_S * 1000})")
        out["panning"] = _frames(page.evaluate("window.__pan"))
        out["readings_per_s_seen"] = page.inner_text('[data-kpi="rate"]')

        if renderer == "canvas":
            started = time.perf_counter()
            page.evaluate("location.hash = '#/alerts'")
            page.wait_for_selector(".alert-row")
            out["alerts_table_ms"] = (time.perf_counter() - started) * 1000
            out["alerts_shown"] = page.inner_text(".alerts-count")
            page.evaluate("() => { window.__scroll = (" + FRAME_SAMPLER + ")(5000); }")
            page.evaluate(SCROLLER)
            out["alerts_scroll"] = _frames(page.evaluate("window.__scroll"))
            page.evaluate("location.hash = '#/'")
            page.wait_for_selector(".map-panel[data-complete='1']")

        start = _metrics(cdp, page)
        peak = start["js_heap_mb"]
        deadline = time.monotonic() + args.minutes * 60
        while time.monotonic() < deadline:
            page.wait_for_timeout(min(15_000, max(0, (deadline - time.monotonic()) * 1000)))
            peak = max(peak, _metrics(cdp, page)["js_heap_mb"])
        end_metrics = _metrics(cdp, page)
        out["memory"] = {"start": start, "end": end_metrics, "peak_js_heap_mb": peak}
        out["conn_state"] = page.get_attribute(".conn", "data-state")
        browser.close()
    return out


# -- report ---------------------------------------------------------------------------------


def _row(label: str, canvas: float | None, dom: float | None, unit: str) -> str:
    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{v:,.1f}"

    return f"  {label:<34} {fmt(canvas):>12} {fmt(dom):>12}  {unit}"


def _report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    canvas, dom = results
    print(
        f"\nconsole benchmark: {args.devices:,} devices, {args.alerts:,} open alerts, "
        f"{args.rate:,} readings/s, {args.events} alert events/s and {args.events} presence "
        f"changes/s; {args.minutes:g} min per renderer for memory"
    )
    print(f"  {'':<34} {'canvas':>12} {'DOM (base)':>12}")
    print(
        _row("snapshot applied", canvas["snapshot_ms"], dom["snapshot_ms"], "ms after navigation")
    )
    print(_row("first complete map render", canvas["first_render_ms"], dom["first_render_ms"],
               "ms after navigation"))  # fmt: skip
    print(_row("  ...and on screen", canvas["first_paint_ms"], dom["first_paint_ms"],
               "ms after navigation"))  # fmt: skip
    for phase in ("idle", "panning"):
        c, d = canvas[phase], dom[phase]
        print(f"  frames while updates arrive ({phase}, {SAMPLE_S:g} s):")
        for key, unit in (
            ("frames", "frames"),
            ("p50_ms", "ms"),
            ("p95_ms", "ms"),
            ("p99_ms", "ms"),
            ("max_ms", "ms"),
            ("over_25ms_pct", "% of frames (a frame missed)"),
            ("over_50ms_pct", "% of frames"),
            ("long_tasks", "tasks > 50 ms"),
            ("blocking_ms", "ms blocked"),
            ("map_renders", "map redraws"),
            ("render_ms_avg", "ms per redraw (script only)"),
        ):
            print(_row(f"  {key}", c.get(key), d.get(key), unit))
    print(
        f"  alerts table ({canvas['alerts_shown']}): first row {canvas['alerts_table_ms']:.0f} ms"
    )
    s = canvas["alerts_scroll"]
    print(
        f"    scrolling top to bottom in 5 s: p50 {s['p50_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms, "
        f"max {s['max_ms']:.1f} ms, {s['over_25ms_pct']:.1f} % of frames over 25 ms"
    )
    print(f"  memory after {args.minutes:g} min under load:")
    for key, unit in (("js_heap_mb", "MiB"), ("perf_memory_mb", "MiB"), ("dom_nodes", "nodes"),
                      ("listeners", "listeners")):  # fmt: skip
        print(
            _row(
                f"  {key} start", canvas["memory"]["start"][key], dom["memory"]["start"][key], unit
            )
        )
        print(_row(f"  {key} end", canvas["memory"]["end"][key], dom["memory"]["end"][key], unit))
    print(_row("  js heap peak", canvas["memory"]["peak_js_heap_mb"],
               dom["memory"]["peak_js_heap_mb"], "MiB"))  # fmt: skip
    print(
        f"  readings/s shown by the console: canvas {canvas['readings_per_s_seen']}, "
        f"DOM {dom['readings_per_s_seen']}; connection at the end: canvas "
        f"{canvas['conn_state']}, DOM {dom['conn_state']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=2.0, help="memory phase per renderer")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--alerts", type=int, default=1_000)
    parser.add_argument("--rate", type=int, default=1_000, help="readings per second")
    parser.add_argument(
        "--events", type=int, default=5, help="alert events (and presence changes)/s"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    args = parser.parse_args()
    if not (DIST / "index.html").exists():
        parser.error("console/dist is not built: run `npm ci && npm run build` in console/")
    if not CHROMIUM.exists():
        parser.error(f"{CHROMIUM} is missing: apt-get install chromium")
    with _server(args) as base:
        results = [_measure(base, renderer, args) for renderer in ("canvas", "dom")]
    _report(results, args)
    if args.json:
        print(orjson.dumps({"args": vars(args), "results": results}).decode())


if __name__ == "__main__":
    main()
