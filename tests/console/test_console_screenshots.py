"""Every view of the console, in English and Japanese, rendered and photographed.

The screenshots go to ``$CITYOPS_SCREENSHOTS`` when it is set (the README's
pictures: ``CITYOPS_SCREENSHOTS=docs/screenshots pytest tests/console -k
screenshots``), else to a temporary folder. Either way the test proves that
each view renders in both languages without a page or console error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from tests.console.conftest import Consoles, ConsoleStack

pytestmark = pytest.mark.slow

LANGUAGES = {"en": "en-US", "ja": "ja-JP"}
WATER_TANK = "tank-aoba-001"


def _folder(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CITYOPS_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def _go(page: Page, route: str) -> None:
    await page.evaluate("route => { location.hash = route; }", route)


async def _shot(page: Page, folder: Path, name: str, *, full: bool = False) -> None:
    await page.mouse.move(0, 0)
    await page.screenshot(path=str(folder / f"{name}.png"), full_page=full)


def _alert_with_series(stack: ConsoleStack) -> str:
    rows = stack.rows(
        "SELECT id FROM alerts WHERE source = 'live' AND device_id IS NOT NULL"
        " AND channel IS NOT NULL ORDER BY raised_at LIMIT 1"
    )
    assert rows
    return str(rows[0][0])


@pytest.mark.parametrize("language", sorted(LANGUAGES))
async def test_screenshots_of_every_view(
    consoles: Consoles, console_stack: ConsoleStack, tmp_path: Path, language: str
) -> None:
    folder = _folder(tmp_path)
    locale = LANGUAGES[language]
    login = await consoles.open(locale=locale)
    await expect(login.locator("#login-name")).to_be_visible()
    await _shot(login, folder, f"login-{language}")

    page = await consoles.signed_in("admin", locale=locale)  # every view and action
    await expect(page.locator(".map-panel")).to_have_attribute("data-complete", "1")
    await expect(page.locator('[data-kpi="rate"]')).not_to_have_text(re.compile(r"^(—|0)$"))
    await _shot(page, folder, f"overview-{language}")

    # The time slider, an hour back.
    slider = page.locator("#time-slider")
    await slider.focus()
    for _ in range(60):
        await page.keyboard.press("ArrowLeft")
    await expect(page.locator(".slider-panel")).to_have_attribute(
        "data-shown-at", re.compile(r"\d+")
    )
    await _shot(page, folder, f"overview-history-{language}")
    await page.keyboard.press("End")
    await expect(page.locator(".slider-panel")).to_have_attribute("data-mode", "live")

    await _go(page, "#/alerts")
    await expect(page.locator(".alert-row").first).to_be_visible()
    await _shot(page, folder, f"alerts-{language}")

    alert_id = _alert_with_series(console_stack)
    await _go(page, f"#/alerts/{alert_id}")
    await expect(page.locator(".page-alert .chart .uplot")).to_be_visible()
    await expect(page.locator(".timeline li").first).to_be_visible()
    await _shot(page, folder, f"alert-{language}")

    # A water tank: its rule's raise and clear thresholds are drawn on the chart.
    await _go(page, f"#/devices/{WATER_TANK}")
    await expect(page.locator(".page-device .chart .uplot").first).to_be_visible()
    await _shot(page, folder, f"device-live-{language}", full=True)
    await page.locator('[role="tab"][data-mode="history"]').click()
    await page.locator('[data-range="24h"]').click()
    await expect(page.locator("[data-bucket]").first).to_be_visible()
    await expect(page.locator(".page-device .chart .uplot").first).to_be_visible()
    await _shot(page, folder, f"device-history-{language}", full=True)
    await page.locator('[role="tab"][data-mode="live"]').click()

    await _go(page, "#/replay")
    await expect(page.locator("#replay-recording")).to_have_value(console_stack.recording)
    await page.locator("#replay-speed").fill("10")
    await page.locator(".replay-form [type=submit]").click()
    await expect(page.locator(".app")).to_have_attribute("data-source", "replay")
    run = page.locator('.run[data-state="running"]').first
    await expect(run.get_by_role("progressbar")).not_to_have_attribute("value", "0")
    await _shot(page, folder, f"replay-{language}")
    await _go(page, "#/")
    await expect(page.locator(".map-watermark")).to_be_visible()
    await expect(page.locator('[data-kpi="rate"]')).not_to_have_text(re.compile(r"^(—|0)$"))
    await _shot(page, folder, f"overview-replay-{language}")
    await _go(page, "#/replay")
    stop = page.locator('.run[data-state="running"] [data-steer="stop"]')
    if await stop.count():
        await stop.first.click()
    await page.locator(".replay-banner button").click()
    await expect(page.locator(".app")).to_have_attribute("data-source", "live")
