"""OASIS CAP 1.2 export of cityops alerts, and an Atom feed of them (pure, no I/O).

One CAP document describes one *version* of an alert, so re-exporting a
version yields the same bytes, and its identifier is
``urn:cityops:{sender}:alert:{alert id}:{version}``. ``sent`` is the time
the alert reached that version (``updated_at``), which keeps the
``references`` of later versions pointing at what version 1 really said.

How the lifecycle maps to CAP (see FACTS.md, "CAP 1.2"):

==============================================  ==========  ======================
alert                                           msgType     urgency
==============================================  ==========  ======================
version 1 (the first raise)                     Alert       from the severity
later versions, condition active                Update      from the severity
condition returned to normal (cleared, closed)  Update      Past (AllClear)
closed by hand while still active (``resolve``  Cancel      Past (AllClear)
of a false alarm)
==============================================  ==========  ======================

Updates and Cancels reference the version-1 document. An operator's
acknowledgement stays an Update (CAP's ``Ack`` is a receipt of a message,
not a person taking charge). Replayed and drill alerts are ``Exercise``,
never ``Actual``.

cityops severities map to CAP as critical → Extreme/Immediate, major →
Severe/Expected, minor → Moderate/Expected, warning → Minor/Future; the
certainty is Observed (sensors saw it), Unlikely on a Cancel.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Final, Literal, cast

from lxml import etree

from control_api.errors import CapError
from rules import Alert, AlertEvent, Rule, Severity

if TYPE_CHECKING:
    from simulators import CityModel

__all__ = [
    "ATOM_MEDIA_TYPE",
    "ATOM_NAMESPACE",
    "CAP_MEDIA_TYPE",
    "CAP_NAMESPACE",
    "CapArea",
    "CapFeedEntry",
    "Category",
    "MessageType",
    "alert_to_cap",
    "cap_category",
    "cap_feed",
    "cap_identifier",
    "cap_message_type",
    "district_area",
    "is_public_safety",
]

CAP_NAMESPACE: Final = "urn:oasis:names:tc:emergency:cap:1.2"
ATOM_NAMESPACE: Final = "http://www.w3.org/2005/Atom"
CAP_MEDIA_TYPE: Final = "application/cap+xml"
ATOM_MEDIA_TYPE: Final = "application/atom+xml"

MessageType = Literal["Alert", "Update", "Cancel"]
Category = Literal[
    "Geo", "Met", "Safety", "Security", "Rescue", "Fire", "Health", "Env", "Transport", "Infra",
    "CBRNE", "Other",
]  # fmt: skip

_SEVERITY: Final[dict[Severity, str]] = {
    "critical": "Extreme",
    "major": "Severe",
    "minor": "Moderate",
    "warning": "Minor",
}
_URGENCY: Final[dict[Severity, str]] = {
    "critical": "Immediate",
    "major": "Expected",
    "minor": "Expected",
    "warning": "Future",
}
# FIWARE Alert subCategory (the rules' ``subcategory``) → CAP category.
_SUBCATEGORY_CATEGORY: Final[dict[str, Category]] = {
    "buildingFire": "Fire",
    "forestFire": "Fire",
    "earthquake": "Geo",
    "tsunami": "Geo",
    "flood": "Met",
    "heavyRain": "Met",
    "gasLeak": "Safety",
    "assistance": "Rescue",
    "airPollution": "Env",
    "waterSupply": "Infra",
    "streetlightFault": "Infra",
    "highTemperature": "Health",
    "trafficJam": "Transport",
    "hazardOnRoad": "Transport",
    "parkingFull": "Transport",
}
# Words in a rule id or channel, for rules without a known subcategory.
_KEYWORD_CATEGORY: Final[tuple[tuple[str, Category], ...]] = (
    ("fire", "Fire"),
    ("smoke", "Fire"),
    ("seismic", "Geo"),
    ("quake", "Geo"),
    ("flood", "Met"),
    ("river", "Met"),
    ("rain", "Met"),
    ("gas", "Safety"),
)
_DOMAIN_CATEGORY: Final[dict[str, Category]] = {
    "traffic": "Transport",
    "facility": "Infra",
    "emergency": "Safety",
}
_EXERCISE_NOTE: Final = {
    "replay": "Exercise: replay of recorded data, not a real event.",
    "drill": "Exercise: drill, not a real event.",
}
# lxml takes None as the default-namespace prefix; lxml-stubs types nsmap as
# Mapping[str, str] and would reject it.
_CAP_NSMAP: Final = cast("dict[str, str]", {None: CAP_NAMESPACE})
_ATOM_NSMAP: Final = cast("dict[str, str]", {None: ATOM_NAMESPACE})
# CAP forbids spaces, commas, "<" and "&" in identifiers and the sender; we
# also keep them printable ASCII so they survive URNs and Atom ids unchanged.
_TOKEN = re.compile(r"(?:(?![,<&])[!-~])+")
_LANGUAGE = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")
# Characters XML 1.0 cannot carry (controls, lone surrogates, U+FFFE/U+FFFF).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True, slots=True)
class CapArea:
    """Where an alert applies: a description and, optionally, a polygon.

    Attributes:
        description: The ``areaDesc``, e.g. ``"Aoba, Minamikawa-shi"``.
        polygon: Vertices as ``(lat, lon)`` in WGS 84 degrees (not GeoJSON's
            ``lon, lat``); closed or not, :attr:`ring` closes it. Empty for an
            area known only by name.

    Raises:
        CapError: an empty description, a polygon with fewer than 3 distinct
            points, or a coordinate out of range.
    """

    description: str
    polygon: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.description.strip():
            msg = "CAP area: the description (areaDesc) is empty"
            raise CapError(msg)
        for i, point in enumerate(self.polygon):
            if len(point) != 2:
                msg = f"CAP area {self.description!r}: point {i} is {point!r}, not (lat, lon)"
                raise CapError(msg)
            lat, lon = point
            if not (math.isfinite(lat) and -90.0 <= lat <= 90.0):
                msg = f"CAP area {self.description!r}: point {i} latitude {lat!r} not in ±90"
                raise CapError(msg)
            if not (math.isfinite(lon) and -180.0 <= lon <= 180.0):
                msg = f"CAP area {self.description!r}: point {i} longitude {lon!r} not in ±180"
                raise CapError(msg)
        distinct = len(set(self.polygon))
        if self.polygon and distinct < 3:
            msg = (
                f"CAP area {self.description!r}: a polygon needs at least 3 distinct points, "
                f"got {distinct}"
            )
            raise CapError(msg)

    @property
    def ring(self) -> tuple[tuple[float, float], ...]:
        """The polygon with its first point repeated at the end (CAP wants a closed ring)."""
        if not self.polygon or self.polygon[0] == self.polygon[-1]:
            return self.polygon
        return (*self.polygon, self.polygon[0])


@dataclass(frozen=True, slots=True)
class CapFeedEntry:
    """One alert for :func:`cap_feed`, with what its CAP document needs.

    Attributes:
        alert: The alert, at the version to publish.
        rule: Its rule, for the category, event name and public-safety test.
        area: Where it applies (default: its district's name).
        events: Its events; the one of this version explains the change.
        link: URL of this alert's CAP document, if the API serves one.
    """

    alert: Alert
    rule: Rule | None = None
    area: CapArea | None = None
    events: tuple[AlertEvent, ...] = ()
    link: str | None = None


def district_area(city: CityModel, district: str) -> CapArea:
    """The area of one district of a simulator city model.

    The city file already lists district polygons as ``[lat, lon]``, the
    order CAP uses, so no swap happens here.

    Raises:
        CapError: the city has no such district.
    """
    for d in city.districts:
        if d.name == district:
            return CapArea(f"{d.label or d.name}, {city.label or city.name}", d.polygon)
    known = ", ".join(d.name for d in city.districts)
    msg = f"no district {district!r} in city {city.name!r} (districts: {known})"
    raise CapError(msg)


def cap_identifier(sender: str, alert_id: str, version: int) -> str:
    """The CAP ``identifier`` of one version of an alert (stable across re-exports)."""
    return f"{_alert_urn(sender, alert_id)}:{version}"


def cap_message_type(alert: Alert) -> MessageType:
    """``Alert`` for version 1, ``Cancel`` for a false alarm, else ``Update``.

    A false alarm is an alert closed while its condition is still active:
    only ``AlertLifecycle.resolve`` (a person, with a note, on a rule with
    ``resolve_manually``) does that; every other way to ``closed`` passes
    through the condition clearing.
    """
    if alert.version <= 1:
        return "Alert"
    if alert.state == "closed" and alert.active:
        return "Cancel"
    return "Update"


def cap_category(alert: Alert, rule: Rule | None = None) -> Category:
    """The CAP category: by the rule's subcategory, then words, then domain.

    ``fire``/``smoke`` → Fire, ``seismic``/``quake`` → Geo,
    ``flood``/``river``/``rain`` → Met in the rule id or channel; else the
    domain (traffic → Transport, facility → Infra); else Safety.
    """
    if rule is not None and rule.subcategory in _SUBCATEGORY_CATEGORY:
        return _SUBCATEGORY_CATEGORY[rule.subcategory]
    words = re.split(r"[^a-z0-9]+", f"{alert.rule_id} {alert.channel or ''}".lower())
    for keyword, category in _KEYWORD_CATEGORY:
        if any(keyword in word for word in words):
            return category
    domains = _domains(rule)
    if len(domains) == 1:
        return _DOMAIN_CATEGORY.get(next(iter(domains)), "Safety")
    return "Safety"


def is_public_safety(alert: Alert, rule: Rule | None) -> bool:
    """Whether the public should see this alert in the CAP feed.

    Public: alerts of rules on the ``emergency`` domain (fire, gas, flood,
    earthquake, call posts) and every alert that is critical or major now
    (after escalation), whatever its domain: a signal failure or a burst
    main matters to people on the street. Not public: device-health rules
    (those using ``offline()`` or ``no_data()``), whatever their domain or
    severity; a silent gauge concerns the engineers, not residents. Without
    the rule only the severity is known.
    """
    if alert.severity in ("critical", "major"):
        return rule is None or not rule.uses_timers
    return rule is not None and not rule.uses_timers and "emergency" in _domains(rule)


def alert_to_cap(
    alert: Alert,
    *,
    events: Iterable[AlertEvent] = (),
    sender: str,
    area: CapArea | None = None,
    rule: Rule | None = None,
    tz: tzinfo = UTC,
    language: str = "en-US",
    sender_name: str = "",
) -> bytes:
    """One version of an alert as a CAP 1.2 document (UTF-8, with an XML declaration).

    Args:
        alert: The alert at the version to export.
        events: The alert's events (any subset); the one of ``alert.version``
            explains the change in ``<note>``. Only system facts go out,
            never an operator's free text.
        sender: The CAP sender, e.g. ``ops@city.example.jp`` (no spaces,
            commas, ``<`` or ``&``).
        area: Where it applies; by default the alert's district name, without
            a polygon.
        rule: The alert's rule, for the category, event name and description.
        tz: Zone of the written times (UTC is written ``-00:00``).
        language: The info language, ``en-US`` or e.g. ``ja-JP``.
        sender_name: Human name of the sender (``senderName``), if any.

    Raises:
        CapError: an invalid sender, alert id or language, a rule or event of
            another alert, or a time that cannot be written.
    """
    root = _alert_element(
        alert,
        events=tuple(events),
        sender=sender,
        area=area,
        rule=rule,
        tz=tz,
        language=language,
        sender_name=sender_name,
    )
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)


def cap_feed(
    entries: Iterable[CapFeedEntry],
    *,
    sender: str,
    feed_url: str,
    updated: float,
    title: str = "cityops public alerts",
    sender_name: str = "",
    tz: tzinfo = UTC,
    language: str = "en-US",
    keep_closed_s: float = 3600.0,
    exercises: bool = False,
) -> bytes:
    """An Atom 1.0 feed (``application/atom+xml``) of public-safety alerts.

    Each ``<entry>`` carries the whole CAP document as an XML child of
    ``<content type="application/cap+xml">``, as public CAP feeds do. The
    entry id is the alert's (it stays across versions), ``updated`` is the
    version's time. Newest first.

    Included: entries whose alert :func:`is_public_safety` and is open, or
    closed within ``keep_closed_s`` of ``updated`` (so a poller gets the
    final all-clear or Cancel before the entry drops out). Replay and drill
    alerts only with ``exercises``.

    Args:
        entries: The candidate alerts with their rules, areas and events.
        sender: The CAP sender of every document; also the feed's author.
        feed_url: The feed's own URL (its id and ``rel="self"`` link).
        updated: When the feed was built (epoch seconds).
        title: The feed title.
        sender_name: Human name of the sender; the author name when given.
        tz: Zone of the CAP times.
        language: The CAP info language.
        keep_closed_s: How long a closed alert stays in the feed.
        exercises: Include replay and drill alerts (status Exercise).

    Raises:
        CapError: two entries for one alert, or an entry :func:`alert_to_cap`
            refuses.
    """
    _check_token(sender, "sender")
    chosen: dict[str, CapFeedEntry] = {}
    for entry in entries:
        a = entry.alert
        if a.id in chosen:
            msg = f"CAP feed: alert {a.id!r} is listed twice"
            raise CapError(msg)
        closed_at = a.closed_at if a.closed_at is not None else a.updated_at
        current = a.state != "closed" or closed_at >= updated - keep_closed_s
        live = a.source == "live" or exercises
        if current and live and is_public_safety(a, entry.rule):
            chosen[a.id] = entry

    atom = f"{{{ATOM_NAMESPACE}}}"
    feed = etree.Element(f"{atom}feed", nsmap=_ATOM_NSMAP)
    etree.SubElement(feed, f"{atom}id").text = _xml_text(feed_url)
    etree.SubElement(feed, f"{atom}title").text = _xml_text(title)
    etree.SubElement(feed, f"{atom}updated").text = _atom_time(updated)
    author = etree.SubElement(feed, f"{atom}author")
    etree.SubElement(author, f"{atom}name").text = _xml_text(sender_name or sender)
    etree.SubElement(feed, f"{atom}link", rel="self", type=ATOM_MEDIA_TYPE, href=feed_url)
    ordered = sorted(chosen.values(), key=lambda e: (-e.alert.updated_at, e.alert.id))
    for entry in ordered:
        a = entry.alert
        cap = _alert_element(
            a,
            events=entry.events,
            sender=sender,
            area=entry.area,
            rule=entry.rule,
            tz=tz,
            language=language,
            sender_name=sender_name,
        )
        item = etree.SubElement(feed, f"{atom}entry")
        etree.SubElement(item, f"{atom}id").text = _alert_urn(sender, a.id)
        etree.SubElement(item, f"{atom}title").text = _xml_text(_headline(a, entry.rule))
        etree.SubElement(item, f"{atom}updated").text = _atom_time(a.updated_at)
        if entry.link is not None:
            etree.SubElement(
                item, f"{atom}link", rel="alternate", type=CAP_MEDIA_TYPE, href=entry.link
            )
        etree.SubElement(item, f"{atom}content", type=CAP_MEDIA_TYPE).append(cap)
    return etree.tostring(feed, xml_declaration=True, encoding="UTF-8", pretty_print=True)


# -- the document ---------------------------------------------------------------


def _alert_element(
    alert: Alert,
    *,
    events: tuple[AlertEvent, ...],
    sender: str,
    area: CapArea | None,
    rule: Rule | None,
    tz: tzinfo,
    language: str,
    sender_name: str,
) -> etree._Element:
    """The ``<alert>`` element of :func:`alert_to_cap`."""
    _check_token(sender, "sender")
    _check_token(alert.id, "alert id")
    if alert.version < 1:
        msg = f"alert {alert.id!r}: version {alert.version} (versions start at 1)"
        raise CapError(msg)
    if rule is not None and rule.id != alert.rule_id:
        msg = f"alert {alert.id!r} is of rule {alert.rule_id!r}, not {rule.id!r}"
        raise CapError(msg)
    if not _LANGUAGE.fullmatch(language):
        msg = f"CAP language {language!r} is not a language tag like 'en-US' or 'ja-JP'"
        raise CapError(msg)
    for e in events:
        if e.alert_id != alert.id:
            msg = f"event of alert {e.alert_id!r} given with alert {alert.id!r}"
            raise CapError(msg)
    if alert.incident_id is not None:
        _check_token(alert.incident_id, "incident id")
    change = next((e for e in events if e.version == alert.version), None)
    kind = cap_message_type(alert)
    past = kind == "Cancel" or not alert.active

    root = etree.Element(_cap("alert"), nsmap=_CAP_NSMAP)
    _sub(root, "identifier", cap_identifier(sender, alert.id, alert.version))
    _sub(root, "sender", sender)
    _sub(root, "sent", _cap_time(alert.updated_at, tz, alert))
    _sub(root, "status", "Actual" if alert.source == "live" else "Exercise")
    _sub(root, "msgType", kind)
    _sub(root, "scope", "Public")
    note = " ".join(filter(None, (_EXERCISE_NOTE.get(alert.source), _change_note(alert, change))))
    if note:
        _sub(root, "note", note)
    if kind != "Alert":
        first = cap_identifier(sender, alert.id, 1)
        _sub(root, "references", f"{sender},{first},{_cap_time(alert.raised_at, tz, alert)}")
    if alert.incident_id is not None:
        _sub(root, "incidents", alert.incident_id)

    info = _sub(root, "info")
    _sub(info, "language", language)
    _sub(info, "category", cap_category(alert, rule))
    _sub(info, "event", rule.name if rule is not None and rule.name else alert.rule_id)
    if past:
        _sub(info, "responseType", "AllClear")
    _sub(info, "urgency", "Past" if past else _URGENCY[alert.severity])
    _sub(info, "severity", _SEVERITY[alert.severity])
    _sub(info, "certainty", "Unlikely" if kind == "Cancel" else "Observed")
    _value_pair(info, "eventCode", "cityops:rule", alert.rule_id)
    _sub(info, "onset", _cap_time(alert.raised_at, tz, alert))
    if sender_name:
        _sub(info, "senderName", sender_name)
    _sub(info, "headline", _headline(alert, rule))
    about = rule.description.strip() if rule is not None else ""
    if about:  # without the rule's description it would only repeat the headline
        _sub(info, "description", "\n\n".join(filter(None, (alert.message, about))))
    for name, value in _parameters(alert):
        _value_pair(info, "parameter", f"cityops:{name}", value)
    if area is None and alert.district.strip():
        area = CapArea(alert.district)
    if area is not None:
        area_el = _sub(info, "area")
        _sub(area_el, "areaDesc", area.description)
        if area.polygon:
            _sub(area_el, "polygon", " ".join(f"{_deg(lat)},{_deg(lon)}" for lat, lon in area.ring))
    return root


def _parameters(alert: Alert) -> list[tuple[str, str]]:
    """Values of the alert that have no CAP element, as ``(name, value)``."""
    out = [
        ("alertId", alert.id),
        ("alertVersion", str(alert.version)),
        ("rule", alert.rule_id),
        ("occurrences", str(alert.occurrences)),
    ]
    if alert.device_id:
        out.append(("device", alert.device_id))
    if alert.channel:
        out.append(("channel", alert.channel))
    if alert.value is not None:
        out.append(("value", repr(alert.value)))
    if alert.escalation_level:
        out.append(("escalationLevel", str(alert.escalation_level)))
    return out


def _change_note(alert: Alert, change: AlertEvent | None) -> str:
    """What this version changed, in words fit for the public (no operator notes)."""
    if cap_message_type(alert) == "Cancel":
        return "Withdrawn: closed by the operations centre while still reported (false alarm)."
    action = change.action if change is not None else None
    if action == "raise" and alert.version > 1:
        return f"Reported again (occurrence {alert.occurrences})."
    if action == "escalate":
        return f"Escalated; severity now {alert.severity}."
    if action == "acknowledge":
        return "Acknowledged by the operations centre."
    if action == "renotify":
        return "Still active."
    if alert.version > 1 and not alert.active:
        return "Returned to normal."
    return ""


def _headline(alert: Alert, rule: Rule | None) -> str:
    """The alert's message, or the rule's name when the message is empty."""
    return alert.message or (rule.name if rule is not None else "") or alert.rule_id


# -- small writers ------------------------------------------------------------------


def _cap(name: str) -> str:
    return f"{{{CAP_NAMESPACE}}}{name}"


def _sub(parent: etree._Element, name: str, text: str | None = None) -> etree._Element:
    """A CAP child element with (cleaned) text."""
    element = etree.SubElement(parent, _cap(name))
    if text is not None:
        element.text = _xml_text(text)
    return element


def _value_pair(parent: etree._Element, name: str, value_name: str, value: str) -> None:
    """An ``eventCode``/``parameter``/``geocode`` with its ``valueName`` and ``value``."""
    pair = _sub(parent, name)
    _sub(pair, "valueName", value_name)
    _sub(pair, "value", value)


def _xml_text(text: str) -> str:
    """Text with characters XML 1.0 cannot carry replaced by U+FFFD.

    Messages embed device state strings from MQTT payloads; one stray
    control character must not make the public export fail.
    """
    return _NOT_XML.sub("\ufffd", text)


def _check_token(value: str, what: str) -> None:
    if not _TOKEN.fullmatch(value):
        msg = (
            f"CAP {what} {value!r}: use printable ASCII without spaces, commas, '<' or '&'"
            if value
            else f"CAP {what} is empty"
        )
        raise CapError(msg)


def _alert_urn(sender: str, alert_id: str) -> str:
    return f"urn:cityops:{sender}:alert:{alert_id}"


def _domains(rule: Rule | None) -> set[str]:
    """The domains a rule watches (a correlation rule: those of its conditions)."""
    if rule is None:
        return set()
    found = set(rule.subject.domains)
    if rule.correlation is not None:
        for condition in rule.correlation.conditions:
            found.update(condition.subject.domains)
    return found


def _cap_time(ts: float, tz: tzinfo, alert: Alert) -> str:
    """CAP date-time: whole seconds, explicit offset, UTC as ``-00:00``."""
    when = _datetime(ts, tz, f"alert {alert.id!r}")
    offset = when.utcoffset()
    minutes = int(offset.total_seconds()) // 60 if offset is not None else 0
    if minutes == 0:
        zone = "-00:00"  # CAP 1.2 §3.3.2: UTC is "-00:00", never "Z" or "+00:00"
    else:
        sign = "+" if minutes > 0 else "-"
        zone = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return _stamp(when) + zone


def _atom_time(ts: float) -> str:
    """RFC 3339 UTC time for Atom."""
    return _stamp(_datetime(ts, UTC, "CAP feed")) + "Z"


def _datetime(ts: float, tz: tzinfo, what: str) -> datetime:
    try:
        return datetime.fromtimestamp(math.floor(ts), tz)
    except (OverflowError, OSError, ValueError) as exc:
        msg = f"{what}: time {ts!r} cannot be written as a date"
        raise CapError(msg) from exc


def _stamp(when: datetime) -> str:
    # strftime("%Y") does not pad years before 1000; the schema wants 4 digits.
    return (
        f"{when.year:04d}-{when.month:02d}-{when.day:02d}"
        f"T{when.hour:02d}:{when.minute:02d}:{when.second:02d}"
    )


def _deg(value: float) -> str:
    """Degrees with 6 decimals (about 0.1 m), trailing zeros dropped, never ``-0``."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text
