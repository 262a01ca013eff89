"""The console end to end, in headless Chromium, against the whole stack.

The stack (``conftest.py``) runs the API, the ingester with the shipped rules
and the simulated city live; a fire of the last nine minutes left open
alerts. Every wait is one of Playwright's auto-waiting expectations; a page
error or a console error fails the test (``consoles`` fixture).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from playwright.async_api import Page, expect

from cityops.settings import MqttEndpoint
from simulators import load_city
from tests.console.conftest import Consoles, ConsoleStack

pytestmark = pytest.mark.slow


async def _go(page: Page, route: str) -> None:
    await page.evaluate("route => { location.hash = route; }", route)


def _publish(stack: ConsoleStack, topic: str, payload: dict[str, object]) -> None:
    endpoint = MqttEndpoint.parse(stack.mqtt_url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="console-test-publisher")
    if endpoint.username:
        client.username_pw_set(endpoint.username, endpoint.password)
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    try:
        client.publish(topic, orjson.dumps(payload), qos=1).wait_for_publish(timeout=10)
    finally:
        client.loop_stop()
        client.disconnect()


async def test_sign_in_and_the_overview_fills_from_live_data(
    consoles: Consoles, console_stack: ConsoleStack
) -> None:
    consoles.errors.allow(r"401 \(Unauthorized\)")  # the wrong password, on purpose
    page = await consoles.open()
    await expect(page.get_by_role("heading", name="Sign in to cityops")).to_be_visible()
    await page.get_by_label("User name").fill("operator")
    await page.get_by_label("Password").fill("not the password")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#login-error")).to_have_text("Wrong user name or password.")

    await consoles.login(page, "operator")
    conn = page.get_by_role("status", name="Connection")
    await expect(conn).to_have_text(re.compile("Live"))
    # Every device of the city on the map, positioned from the city model.
    map_panel = page.locator(".map-panel")
    await expect(map_panel).to_have_attribute("data-complete", "1")
    await expect(map_panel).to_have_attribute("data-devices", str(console_stack.city_devices))
    await expect(page.get_by_role("img", name=re.compile(r"Map of .*1177 devices"))).to_be_visible()
    # The simulator's presence and readings arrive live.
    await expect(page.locator('[data-kpi="online"]')).not_to_have_text(re.compile(r"^(—|0)$"))
    await expect(page.locator('[data-kpi="rate"]')).not_to_have_text(re.compile(r"^(—|0)$"))
    # The fire's alerts: KPIs, the feed, and the unacknowledged count in the tab title.
    await expect(page.locator('[data-kpi="open-critical"] .kpi-count')).not_to_have_text("0")
    await expect(page.locator("#alert-feed .feed-item").first).to_be_visible()
    await expect(page).to_have_title(re.compile(r"^\(\d+\) .*Minamikawa"))
    # What an operator may not do is not offered.
    await expect(page.get_by_role("link", name="Replay")).to_have_count(0)
    await expect(page.get_by_role("button", name="Show sandbox")).to_have_count(0)


async def test_an_acknowledgement_shows_on_a_second_browser(
    consoles: Consoles, console_stack: ConsoleStack
) -> None:
    responder = await consoles.signed_in("responder")
    operator = await consoles.signed_in("operator")
    for page in (responder, operator):
        await _go(page, "#/alerts")
    # A gas leak on a detector of this test alone (the simulated city never clears it).
    device = f"gas-test-{uuid.uuid4().hex[:6]}"
    _publish(console_stack, f"city/emergency/aoba/{device}", {"ts": time.time(), "lel": 25.0})
    theirs = operator.locator(".alert-row", has_text=device)
    await expect(theirs).to_have_attribute("data-state", "active_unacked")
    alert_id = await theirs.get_attribute("data-alert-id")
    # The operator may not acknowledge a responder's alert: not offered.
    await theirs.click()
    await expect(operator.locator('.actions-bar [data-action="acknowledge"]')).to_have_count(0)
    await expect(operator.locator('.actions-bar [data-action="comment"]')).to_have_count(1)

    # The responder, keyboard first: select the row, press a.
    mine = responder.locator(f'.alert-row[data-alert-id="{alert_id}"]')
    await mine.click()
    await expect(mine).to_have_attribute("aria-selected", "true")
    await responder.keyboard.press("a")
    await expect(responder.locator(".toast").first).to_contain_text("Acknowledge: done")
    await expect(mine).to_have_attribute("data-state", "active_acked")

    # The other browser sees it change, with who did it.
    await expect(theirs).to_have_attribute("data-state", "active_acked")
    await expect(theirs.locator(".c-state")).to_contain_text("responder")
    # And the alert's page shows the acknowledgement in its timeline.
    await _go(operator, f"#/alerts/{alert_id}")
    timeline = operator.get_by_role("list", name="Timeline")
    await expect(timeline.locator('li[data-action="acknowledge"]')).to_contain_text("responder")


async def test_keyboard_filter_select_and_bulk_acknowledge(
    consoles: Consoles, console_stack: ConsoleStack
) -> None:
    page = await consoles.signed_in("responder")
    await _go(page, "#/alerts")
    grid = page.get_by_role("grid", name="Alerts")
    await expect(grid.locator(".alert-row").first).to_be_visible()
    # "/" goes to the search box; the filter applies as one types.
    await page.keyboard.press("/")
    search = page.get_by_label("Search")
    await expect(search).to_be_focused()
    await page.keyboard.type("smoke detected")
    rows = grid.locator(".alert-row")
    await expect(rows.first).to_contain_text("Smoke detected")
    for text in await rows.locator(".c-msg").all_inner_texts():
        assert "Smoke detected" in text
    # Escape returns to the grid; j and k move the selection.
    await page.keyboard.press("Escape")
    first_key = await rows.nth(0).get_attribute("data-key")
    await page.keyboard.press("j")
    await expect(grid.locator('.grid-row[aria-selected="true"]')).not_to_have_attribute(
        "data-key", first_key or ""
    )
    await page.keyboard.press("k")
    await expect(grid.locator('.grid-row[aria-selected="true"]')).to_have_attribute(
        "data-key", first_key or ""
    )
    # Bulk: select every acknowledgeable row shown, acknowledge them at once.
    await page.get_by_role("button", name="Select all acknowledgeable").click()
    bulk = page.get_by_role("button", name=re.compile(r"Acknowledge selected \([1-9]"))
    await bulk.click()
    await expect(page.locator(".toast")).to_contain_text(re.compile(r"\d+ acknowledged, 0 not"))
    await expect(grid.locator('.alert-row[data-state="active_unacked"]')).to_have_count(0)


async def test_a_lost_connection_shows_stale_then_recovers_with_resume(
    consoles: Consoles, console_stack: ConsoleStack
) -> None:
    # A connection cut under the browser's feet: Chromium logs the failed socket.
    consoles.errors.allow("WebSocket connection to .* failed")
    page = await consoles.open(
        via_proxy=True, storage={"cityops.settings": json.dumps({"staleAfterS": 3})}
    )
    await consoles.login(page, "operator")
    conn = page.get_by_role("status", name="Connection")
    await expect(conn).to_have_attribute("data-state", "live")
    await expect(conn).to_have_attribute("data-start", "snapshot")

    console_stack.proxy.stall()  # the socket stays open; nothing moves either way
    await expect(conn).to_have_attribute("data-state", "stale")
    await expect(conn).to_have_text(re.compile(r"Stale: no update for \d+ s"))
    await expect(page.locator(".stale-banner")).to_contain_text("Data may be out of date")
    await expect(page.locator(".app")).to_have_attribute("data-conn", "stale")

    console_stack.proxy.drop()
    console_stack.proxy.resume()
    await expect(conn).to_have_attribute("data-state", "live")
    await expect(conn).to_have_attribute("data-starts", "2")
    await expect(conn).to_have_attribute("data-start", "resumed")
    await expect(page.locator(".stale-banner")).to_be_hidden()
    await expect(page.locator('[data-kpi="online"]')).not_to_have_text(re.compile(r"^(—|0)$"))


async def test_language_follows_the_browser_and_the_switch(
    consoles: Consoles, console_stack: ConsoleStack
) -> None:
    japanese = await consoles.open(locale="ja-JP")
    await expect(japanese.locator("html")).to_have_attribute("lang", "ja")
    await expect(japanese.get_by_role("heading", name="cityops にサインイン")).to_be_visible()

    page = await consoles.signed_in("operator")
    await expect(page.locator("html")).to_have_attribute("lang", "en")
    await page.get_by_label("Language").select_option("ja")
    await expect(page.locator("html")).to_have_attribute("lang", "ja")
    await expect(
        page.get_by_role("navigation").get_by_role("link", name="アラート")
    ).to_be_visible()
    await expect(page.get_by_role("status", name="接続")).to_have_text(re.compile("ライブ"))
    await expect(page.locator('[data-kpi="open-critical"] .kpi-sev-label')).to_have_text("緊急")
    # Times in the city's zone (the browser's is London), ISO dates.
    await _go(page, "#/alerts")
    raised = page.locator(".alert-row .c-raised").first
    await expect(raised).to_have_text(re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$"))
    alert_id = await page.locator(".alert-row").first.get_attribute("data-alert-id")
    rows = console_stack.rows(
        "SELECT to_char(raised_at AT TIME ZONE 'Asia/Tokyo', 'YYYY-MM-DD HH24:MI:SS')"
        " FROM alerts WHERE id = %s",
        alert_id,
    )
    await expect(raised).to_have_text(rows[0][0])
    # The choice survives a reload.
    await page.reload()
    await expect(page.get_by_role("status", name="接続")).to_have_text(re.compile("ライブ"))
    await expect(page.get_by_role("heading", name="アラート")).to_be_visible()


async def test_a_new_critical_alert_is_highlighted_with_a_tone(
    consoles: Consoles, console_stack: ConsoleStack
) -> None:
    page = await consoles.signed_in("responder")
    mute = page.locator(".btn-mute")
    await expect(mute).to_have_text(re.compile("Sound on"))
    await expect(page.locator("html")).not_to_have_attribute("data-tones", re.compile("."))
    panel = f"fire-test-{uuid.uuid4().hex[:6]}"  # a fire panel of this test alone
    _publish(console_stack, f"city/emergency/kawabata/{panel}", {"state": "alarm"})
    banner = page.get_by_role("alert").filter(has_text="New critical alert")
    await expect(banner).to_contain_text(panel)
    await expect(page.locator("html")).to_have_attribute("data-tones", "1")
    await expect(page.locator("#alert-feed .feed-item.is-critical-new")).to_contain_text(panel)
    await expect(page).to_have_title(re.compile(r"^\(\d+\) "))
    # Mute is a visible state.
    await mute.click()
    await expect(mute).to_have_text(re.compile("Muted"))
    await expect(mute).to_have_attribute("aria-pressed", "true")


def _mercator(lat: float, lon: float) -> tuple[float, float]:
    phi = math.radians(lat)
    return (lon + 180) / 360, (1 - math.log(math.tan(phi) + 1 / math.cos(phi)) / math.pi) / 2


async def _screen_position(page: Page, lat: float, lon: float) -> tuple[float, float, str]:
    """Where the map draws (lat, lon) now, from its view (centre, zoom); and the view."""
    view = await page.locator(".map-panel").get_attribute("data-view")
    box = await page.locator(".map-canvas").bounding_box()
    assert view
    assert box
    cx, cy, z = (float(v) for v in view.split(","))
    mx, my = _mercator(lat, lon)
    scale = 256 * 2**z
    return (mx - cx) * scale + box["width"] / 2, (my - cy) * scale + box["height"] / 2, view


async def test_the_map_zooms_unclusters_and_opens_a_device(
    consoles: Consoles, console_stack: ConsoleStack
) -> None:
    page = await consoles.signed_in("operator")
    map_panel = page.locator(".map-panel")
    await expect(map_panel).to_have_attribute("data-complete", "1")
    await expect(map_panel).to_have_attribute("data-clustered", "1")
    canvas = page.get_by_role("img", name=re.compile("Map of"))
    # Keyboard: + zooms in one level around the centre, 0 fits the city again.
    view = await map_panel.get_attribute("data-view")
    await canvas.focus()
    await page.keyboard.press("+")
    await expect(map_panel).not_to_have_attribute("data-view", view or "")
    await page.keyboard.press("0")
    await expect(map_panel).to_have_attribute("data-view", view or "")
    # A click on a cluster zooms in around it; on a single device, it opens its card.
    device = next(d for d in load_city("minamikawa").devices if d.kind == "fire-panel")
    popup = page.locator(".map-popup")
    for _ in range(6):
        x, y, view = await _screen_position(page, device.lat, device.lon)
        await canvas.click(position={"x": x, "y": y})
        if await popup.is_visible():
            break
        await expect(map_panel).not_to_have_attribute("data-view", view)
    await expect(map_panel).to_have_attribute("data-clustered", "0")
    # The devices of the building share its position: the card lists them all.
    await popup.get_by_role("link", name=f"Open device {device.id}").click()
    await expect(page.get_by_role("heading", name=f"Device {device.id}")).to_be_visible()
    await expect(page.locator('.values tr[data-channel="state"]')).to_be_visible()


async def test_an_engineer_replays_a_recording_in_the_sandbox(
    consoles: Consoles, console_stack: ConsoleStack
) -> None:
    page = await consoles.signed_in("engineer")
    await page.get_by_role("navigation").get_by_role("link", name="Replay").click()
    await expect(page.get_by_label("Recording")).to_have_value(console_stack.recording)
    await page.get_by_label("Speed").fill("10")  # nine minutes in 54 s: still running at the end
    await page.get_by_role("button", name="Start replay").click()

    # The console follows the sandbox, and says so everywhere.
    banner = page.locator(".replay-banner")
    await expect(banner).to_contain_text("REPLAY")
    await expect(page.locator(".app")).to_have_attribute("data-source", "replay")
    await expect(page).to_have_title(re.compile(r"^\[REPLAY\] "))
    await expect(page.get_by_role("status", name="Connection")).to_have_attribute(
        "data-state", "live"
    )
    run = page.locator(".run").first
    await expect(run).to_have_attribute("data-state", "running")
    await expect(run.get_by_role("progressbar")).not_to_have_attribute("value", "0")
    await run.get_by_role("button", name="Pause").click()
    await expect(run).to_have_attribute("data-state", "paused")
    await run.get_by_role("button", name="Resume").click()
    await expect(run).to_have_attribute("data-state", "running")

    # The overview draws the sandbox: replayed readings arrive, marked REPLAY.
    await page.get_by_role("navigation").get_by_role("link", name="Overview").click()
    await expect(page.locator(".map-watermark")).to_be_visible()
    await expect(page.locator('[data-kpi="rate"]')).not_to_have_text(re.compile(r"^(—|0)$"))

    await page.get_by_role("navigation").get_by_role("link", name="Replay").click()
    await run.get_by_role("button", name="Stop").click()
    await expect(run).to_have_attribute("data-state", "stopped")
    await banner.get_by_role("button", name="Back to live").click()
    await expect(banner).to_be_hidden()
    await expect(page.locator(".app")).to_have_attribute("data-source", "live")
    await expect(page).not_to_have_title(re.compile("REPLAY"))


async def test_device_charts_draw_thresholds_live_and_history(
    consoles: Consoles, console_stack: ConsoleStack
) -> None:
    page = await consoles.signed_in("operator")
    await _go(page, "#/devices/tank-aoba-001")
    await expect(page.get_by_role("heading", name="Device tank-aoba-001")).to_be_visible()
    await expect(page.get_by_role("tab", name="Live (15 min)")).to_have_attribute(
        "aria-selected", "true"
    )
    # The tank-low rule's thresholds, raise below 0.2 and clear above 0.3, on the chart.
    chart = page.locator('.chart-box[data-channel="fillingLevel"] .chart')
    await expect(chart).to_have_attribute("aria-label", re.compile(r"raise < 0\.2, clear > 0\.3"))
    await expect(chart.locator("canvas").first).to_be_visible()
    # A reading arrives live: the latest values follow (ts ahead: it stays the newest).
    _publish(
        console_stack,
        "city/facility/aoba/tank-aoba-001",
        {"ts": time.time() + 30, "fillingLevel": 0.123},
    )
    await expect(page.locator('.values tr[data-channel="fillingLevel"]')).to_contain_text("0.123")
    # History: a range from the picker; the API chooses the bucket.
    await page.get_by_role("tab", name="History").click()
    await page.get_by_role("button", name="24 h").click()
    box = page.locator('.chart-box[data-channel="fillingLevel"]')
    await expect(box.locator("[data-bucket]")).to_have_text(re.compile(r"Resolution: (raw|1m|15m)"))
    await expect(box.locator(".chart")).to_have_attribute("aria-label", re.compile("raise < 0.2"))
    await page.get_by_role("tab", name="Live (15 min)").click()


async def test_the_time_slider_shows_the_city_as_it_was(
    consoles: Consoles, console_stack: ConsoleStack
) -> None:
    page = await consoles.signed_in("operator")
    feed = page.locator(".feed-panel")
    await expect(feed.locator(".feed-item").first).to_be_visible()
    slider = page.get_by_role("slider", name="Time")
    await slider.focus()
    await page.keyboard.press("Home")  # six hours back: before the fire, before the city ran
    panel = page.locator(".slider-panel")
    await expect(panel).to_have_attribute("data-mode", "history")
    await expect(panel).to_have_attribute("data-shown-at", re.compile(r"\d+"))
    await expect(panel.locator(".slider-label")).to_have_text(
        re.compile(r"^As of \d{4}-\d{2}-\d{2}")
    )
    await expect(panel).to_contain_text("approximated from history buckets")
    await expect(panel.get_by_role("list", name="Reporting at this time")).to_contain_text(
        "fire-panel: 0 of"
    )
    await expect(feed.get_by_role("heading")).to_have_text("Open alerts at this time")
    await expect(feed).to_contain_text("No alert was open at this time.")
    await expect(page.get_by_role("img", name=re.compile("0 with open alerts"))).to_be_visible()
    await panel.get_by_role("button", name="Back to now").click()
    await expect(panel).to_have_attribute("data-mode", "live")
    await expect(feed.get_by_role("heading")).to_have_text("Live alert feed")
    await expect(feed.locator(".feed-item").first).to_be_visible()
