"""SenML JSON (RFC 8428) packs decoded into readings.

The input is a pack already parsed from JSON (a Python list of dicts, from
``orjson`` or the standard ``json`` module); the output is one
:class:`~ingest.model.Reading` per value and one more per sum. Resolution
follows RFC 8428 section 4:

* Base fields ``bn bt bu bv bs bver`` apply to their own record and to every
  later record until a later record sets them again.
* Name = ``bn`` + ``n``: 1 to 128 characters out of ``A-Z a-z 0-9 - : . / _``,
  the first a letter or a digit.
* Time = ``bt`` + ``t`` (a missing one counts as 0). A result below 2**28 is
  relative to "now", which here is the receive time of the message.
* Value = ``bv`` + ``v``. Exactly one of ``v vs vb vd`` per record, unless the
  record has a sum. ``vb`` becomes 1.0 / 0.0; ``vs`` and ``vd`` (the base64
  text as sent) become ``Reading.state``.
* Sum = ``bs`` + ``s``; a record has a sum when it has ``s`` or a ``bs`` is in
  effect (RFC 8428: "If only one of the Base Sum or Sum value is present, the
  missing attribute is considered to have a value of zero"). The sum is stored
  as its own reading on channel ``name + ":sum"``, with the record's unit
  (the RFC's sum is that unit times seconds).
* Unit = ``u``, else ``bu``; an empty unit means none. ``ut`` becomes
  ``Reading.update_period_s``.
* One version per pack: every ``bver`` must equal the first, and records
  before a ``bver`` have the default version 10; a version above 10 is
  rejected.
* Unknown labels are ignored, except labels ending in ``_``
  ("must understand"), which reject the pack.

A pack is accepted whole or rejected whole: any invalid record raises
:class:`~ingest.errors.DecodeError` whose text names the record (0-based index
in the array) and the field, e.g. ``record 3: 'v' is NaN``.

This is the ingest hot path, so the per-record loop avoids regexes and
attribute lookups, caches validated names and units, and builds readings
through the slot descriptors (see ``_reading_factory``).
"""

from __future__ import annotations

import dataclasses
import math
import string
import sys
from collections.abc import Callable
from typing import Final

from ingest.errors import DecodeError
from ingest.model import DeviceRef, Reading

__all__ = [
    "DEFAULT_VERSION",
    "MAX_NAME_LEN",
    "MAX_UNIT_LEN",
    "MAX_VERSION",
    "RELATIVE_TIME_LIMIT",
    "decode_pack",
    "invalid_name_reason",
    "json_type",
    "new_reading",
    "time_bounds_reason",
]

RELATIVE_TIME_LIMIT: Final = float(2**28)
"""Resolved times below this are relative to the receive time (RFC 8428 4.5.3)."""
MAX_NAME_LEN: Final = 128
MAX_UNIT_LEN: Final = 32
DEFAULT_VERSION: Final = 10
MAX_VERSION: Final = 10

_FLOAT_MAX: Final = sys.float_info.max
_KNOWN_LABELS: Final = frozenset(
    ("bn", "bt", "bu", "bv", "bs", "bver", "n", "u", "v", "vs", "vb", "vd", "s", "t", "ut")
)
_BASE_LABELS: Final = frozenset(("bn", "bt", "bu", "bv", "bs", "bver"))
_PLAIN_LABELS: Final = frozenset(("n", "t", "u", "v"))
_VALUE_LABELS: Final = ("v", "vs", "vb", "vd")
_NAME_CHARS: Final = frozenset(string.ascii_letters + string.digits + "-:./_")
_CACHE_MAX: Final = 100_000


class _Missing:
    """Marks an absent label (JSON null is a present, wrongly typed value)."""


_MISSING: Final = _Missing()

# Names and units already validated. Bounded crudely: cleared when full, which
# only costs a re-validation of the names still in use.
_valid_names: set[str] = set()
_valid_units: set[str] = set()


def _number_text(value: float) -> str:
    """A number for a message; huge integers by size (their repr may even fail)."""
    if type(value) is int and value.bit_length() > 64:
        return f"(an integer of {value.bit_length()} bits)"
    return repr(value)


def json_type(value: object) -> str:
    """Describe a parsed JSON value for an error message.

    Args:
        value: Anything a JSON parser returned.

    Returns:
        The JSON type name, with short scalars quoted, e.g. ``string '12'``.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"number {_number_text(value)}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:40] + "…"
        return f"string {shown!r}"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def invalid_name_reason(name: str) -> str | None:
    """Check a SenML name (or a flat-form channel name), with a cache.

    Args:
        name: The resolved name, ``bn`` + ``n``.

    Returns:
        None if the name is valid, else why it is not (without the record).
    """
    if name in _valid_names:
        return None
    if not name:
        return "name is empty"
    if len(name) > MAX_NAME_LEN:
        return f"name {name[:40]!r}… is {len(name)} characters long, more than {MAX_NAME_LEN}"
    if not _NAME_CHARS.issuperset(name):
        bad = next(c for c in name if c not in _NAME_CHARS)
        return f"name {name!r} contains {bad!r} (allowed: A-Z a-z 0-9 - : . / _)"
    if not name[0].isalnum():
        return f"name {name!r} must start with a letter or a digit"
    if len(_valid_names) >= _CACHE_MAX:
        _valid_names.clear()
    _valid_names.add(name)
    return None


def time_bounds_reason(
    ts: float, *, received_at: float, max_past_s: float | None, max_future_s: float | None
) -> str | None:
    """Check a resolved reading time against the receive time.

    Args:
        ts: Resolved device time, seconds since the epoch.
        received_at: Receive time of the message.
        max_past_s: How far before ``received_at`` a reading may be (None: no limit).
        max_future_s: How far after ``received_at`` a reading may be (None: no limit).

    Returns:
        None if the time is finite and within bounds, else why not.
    """
    if not math.isfinite(ts):
        return f"time resolves to {ts}"
    if max_past_s is not None and ts < received_at - max_past_s:
        return (
            f"time {ts:.3f} is {received_at - ts:.0f} s before the receive time"
            f" (max_past_s={max_past_s:.15g})"
        )
    if max_future_s is not None and ts > received_at + max_future_s:
        hint = " (milliseconds instead of seconds?)" if ts > received_at * 100 > 0 else ""
        return (
            f"time {ts:.3f} is {ts - received_at:.0f} s after the receive time"
            f" (max_future_s={max_future_s:.15g}){hint}"
        )
    return None


ReadingFactory = Callable[
    [DeviceRef, str, float, float | None, str | None, str | None, float | None], Reading
]
_READING_FIELDS: Final = (
    "device",
    "channel",
    "ts",
    "value",
    "state",
    "unit",
    "update_period_s",
)


def _reading_factory() -> ReadingFactory:
    """A constructor of ``Reading`` that is about twice as fast as ``Reading(...)``.

    A frozen dataclass's ``__init__`` assigns each field through
    ``object.__setattr__`` (about 850 ns for the 7 fields of ``Reading`` here,
    more than the rest of the decoding of a record). Setting the slots through
    their member descriptors builds the identical object in about half that.
    It is used only while ``Reading`` has exactly the expected slotted fields
    and no ``__post_init__``; otherwise the ordinary constructor is used.
    """
    names = tuple(field.name for field in dataclasses.fields(Reading))
    slots = getattr(Reading, "__slots__", ())
    if names != _READING_FIELDS or tuple(slots) != names or hasattr(Reading, "__post_init__"):
        return Reading
    new = object.__new__
    set_device, set_channel, set_ts, set_value, set_state, set_unit, set_period = (
        getattr(Reading, name).__set__ for name in names
    )

    # Positional on purpose: keyword passing costs more on the hot path.
    def make(  # noqa: PLR0917
        device: DeviceRef,
        channel: str,
        ts: float,
        value: float | None,
        state: str | None,
        unit: str | None,
        update_period_s: float | None,
    ) -> Reading:
        reading = new(Reading)
        set_device(reading, device)
        set_channel(reading, channel)
        set_ts(reading, ts)
        set_value(reading, value)
        set_state(reading, state)
        set_unit(reading, unit)
        set_period(reading, update_period_s)
        return reading

    return make


new_reading: Final[ReadingFactory] = _reading_factory()
"""Build a ``Reading`` from all 7 fields, positionally (fast path of the decoders)."""


def _fail(index: int, reason: str) -> DecodeError:
    return DecodeError(f"record {index}: {reason}")


def _number(index: int, label: str, value: object) -> float:
    """A finite JSON number (not a boolean) as float, else DecodeError."""
    if type(value) is float:
        if math.isfinite(value):
            return value
        text = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        raise _fail(index, f"{label!r} is {text}")
    if type(value) is int:
        if -_FLOAT_MAX <= value <= _FLOAT_MAX:
            return float(value)
        raise _fail(index, f"{label!r} is too large for a double")
    raise _fail(index, f"{label!r} must be a number, got {json_type(value)}")


def _unit(index: int, label: str, value: object) -> str | None:
    """A validated unit string ('' means no unit), else DecodeError."""
    if type(value) is not str:
        raise _fail(index, f"{label!r} must be a string, got {json_type(value)}")
    if value in _valid_units:
        return value
    if not value:
        return None
    if len(value) > MAX_UNIT_LEN:
        raise _fail(index, f"{label!r} is {len(value)} characters long, more than {MAX_UNIT_LEN}")
    if len(_valid_units) >= _CACHE_MAX:
        _valid_units.clear()
    _valid_units.add(value)
    return value


def _check_unknown_labels(index: int, record: dict[str, object]) -> None:
    for label in record:
        if label not in _KNOWN_LABELS and label.endswith("_"):
            raise _fail(index, f"label {label!r} ends in '_' (must be understood): not supported")


def _check_name(index: int, name: str) -> None:
    reason = invalid_name_reason(name)
    if reason is not None:
        raise _fail(index, reason)


def _check_single_value(index: int, record: dict[str, object]) -> None:
    present = [label for label in _VALUE_LABELS if label in record]
    if len(present) > 1:
        raise _fail(
            index,
            f"more than one value field ({', '.join(present)}); a record has exactly one of"
            " v, vs, vb, vd",
        )


def _other_value(
    index: int, record: dict[str, object], max_state_len: int
) -> tuple[float | None, str | None]:
    """The value of a record without ``v``: from ``vs``, ``vb`` or ``vd``, or none."""
    _check_single_value(index, record)
    if "vb" in record:
        flag = record["vb"]
        if type(flag) is not bool:
            raise _fail(index, f"'vb' must be true or false, got {json_type(flag)}")
        return (1.0 if flag else 0.0), None
    for label in ("vs", "vd"):
        if label in record:
            text = record[label]
            if type(text) is not str:
                raise _fail(index, f"{label!r} must be a string, got {json_type(text)}")
            if len(text) > max_state_len:
                raise _fail(
                    index,
                    f"{label!r} is {len(text)} characters long, more than"
                    f" max_state_len={max_state_len}",
                )
            return None, text
    return None, None


def _version(index: int, value: object, current: int | None) -> int:
    if type(value) is not int:
        raise _fail(index, f"'bver' must be an integer, got {json_type(value)}")
    if value > MAX_VERSION:
        shown = _number_text(value)
        raise _fail(index, f"'bver' {shown} is above {MAX_VERSION}, the highest version understood")
    if value < 1:
        raise _fail(index, f"'bver' {_number_text(value)} is not a positive integer")
    if current is None:
        if index > 0 and value != DEFAULT_VERSION:
            raise _fail(
                index,
                f"'bver' {value} differs from the default version {DEFAULT_VERSION} of the"
                " records before it (one version per pack)",
            )
    elif value != current:
        raise _fail(
            index, f"'bver' {value} differs from {current} set earlier (one version per pack)"
        )
    return value


def _overflow_reason(record: object) -> str:
    """Which field of a record holds an integer too large for a double."""
    if isinstance(record, dict):
        for label, value in record.items():
            if type(value) is int and not -_FLOAT_MAX <= value <= _FLOAT_MAX:
                return f"{label!r} is too large for a double"
    return "a number is too large for a double"


def decode_pack(
    pack: object,
    device: DeviceRef,
    *,
    received_at: float,
    max_records: int = 1_000,
    max_state_len: int = 64,
    max_past_s: float | None = None,
    max_future_s: float | None = None,
) -> list[Reading]:
    """Resolve a parsed SenML JSON pack into readings of one device.

    Args:
        pack: The parsed JSON document; must be a non-empty list of objects.
        device: The device named by the topic; every reading belongs to it.
        received_at: Receive time of the message (epoch seconds); relative
            SenML times are resolved against it.
        max_records: Most records accepted in one pack.
        max_state_len: Longest ``vs`` / ``vd`` string accepted.
        max_past_s: Reject readings more than this many seconds before
            ``received_at`` (None: no limit).
        max_future_s: Reject readings more than this many seconds after
            ``received_at`` (None: no limit).

    Returns:
        The readings in record order; a record with a sum adds a reading on
        channel ``name + ":sum"`` after its value reading.

    Raises:
        DecodeError: The pack or one of its records is invalid; the reason
            names the record index and the field.
    """
    if type(pack) is not list:
        msg = f"a SenML pack must be a JSON array, got {json_type(pack)}"
        raise DecodeError(msg)
    count = len(pack)
    if count == 0:
        msg = "SenML pack is empty"
        raise DecodeError(msg)
    if count > max_records:
        msg = f"SenML pack has {count} records, more than max_records={max_records}"
        raise DecodeError(msg)
    earliest = -_FLOAT_MAX if max_past_s is None else received_at - max_past_s
    latest = _FLOAT_MAX if max_future_s is None else received_at + max_future_s

    base_name = ""
    base_time = 0.0
    base_unit: str | None = None
    base_value = 0.0
    base_sum: float | None = None
    version: int | None = None

    readings: list[Reading] = []
    append = readings.append
    make = new_reading
    missing = _MISSING
    known = _KNOWN_LABELS
    plain_labels = _PLAIN_LABELS
    base_labels = _BASE_LABELS
    valid_names = _valid_names
    valid_units = _valid_units
    relative_limit = RELATIVE_TIME_LIMIT
    index = 0
    record: object = None
    try:
        for index, record in enumerate(pack):
            if type(record) is not dict:
                raise _fail(index, f"must be a JSON object, got {json_type(record)}")
            # Nearly every record has only n, t, u and v: one subset test then
            # rules out base fields, unknown labels, sums, ut and extra values.
            plain = record.keys() <= plain_labels
            if not plain:
                if not record.keys() <= known:
                    _check_unknown_labels(index, record)
                if not base_labels.isdisjoint(record):
                    if "bn" in record:
                        base_name = record["bn"]
                        if type(base_name) is not str:
                            raise _fail(index, f"'bn' must be a string, got {json_type(base_name)}")
                    if "bt" in record:
                        base_time = _number(index, "bt", record["bt"])
                    if "bu" in record:
                        base_unit = _unit(index, "bu", record["bu"])
                    if "bv" in record:
                        base_value = _number(index, "bv", record["bv"])
                    if "bs" in record:
                        base_sum = _number(index, "bs", record["bs"])
                    if "bver" in record:
                        version = _version(index, record["bver"], version)

            name = record.get("n", "")
            if type(name) is not str:
                raise _fail(index, f"'n' must be a string, got {json_type(name)}")
            if base_name:
                name = base_name + name
            if name not in valid_names:
                _check_name(index, name)

            t = record.get("t", 0.0)
            if type(t) is not float and type(t) is not int:
                raise _fail(index, f"'t' must be a number, got {json_type(t)}")
            ts = base_time + t
            if ts < relative_limit:
                ts += received_at
            if not earliest <= ts <= latest:
                if type(t) is float and not math.isfinite(t):
                    _number(index, "t", t)  # raises with NaN / Infinity named
                reason = time_bounds_reason(
                    ts, received_at=received_at, max_past_s=max_past_s, max_future_s=max_future_s
                )
                raise _fail(index, reason or f"time {ts} is out of bounds")

            value: float | None
            state: str | None
            v = record.get("v", missing)
            if v is not missing:
                if not plain and ("vs" in record or "vb" in record or "vd" in record):
                    _check_single_value(index, record)
                if type(v) is not float and type(v) is not int:
                    raise _fail(index, f"'v' must be a number, got {json_type(v)}")
                value = base_value + v
                if not -_FLOAT_MAX <= value <= _FLOAT_MAX:
                    _number(index, "v", v)  # raises with NaN / Infinity named
                    raise _fail(index, f"'bv' + 'v' = {base_value} + {v} is not finite")
                state = None
            elif plain:
                value = state = None
            else:
                value, state = _other_value(index, record, max_state_len)

            unit = record.get("u", missing)
            if unit is missing:
                unit = base_unit
            elif type(unit) is not str or unit not in valid_units:
                unit = _unit(index, "u", unit)

            period: float | None = None
            if not plain and "ut" in record:
                period = _number(index, "ut", record["ut"])
                if period < 0:
                    raise _fail(index, f"'ut' {period} is negative")

            if base_sum is not None or (not plain and "s" in record):
                own_sum = _number(index, "s", record.get("s", 0.0))
                total = own_sum + (base_sum or 0.0)
                if not -_FLOAT_MAX <= total <= _FLOAT_MAX:
                    raise _fail(index, f"'bs' + 's' = {base_sum} + {own_sum} is not finite")
                if value is not None or state is not None:
                    append(make(device, name, ts, value, state, unit, period))
                sum_name = name + ":sum"
                if sum_name not in valid_names:
                    _check_name(index, sum_name)
                append(make(device, sum_name, ts, total, None, unit, period))
            elif value is None and state is None:
                raise _fail(index, "no value field (one of v, vs, vb, vd, or a sum s)")
            else:
                append(make(device, name, ts, value, state, unit, period))
    except OverflowError:
        # An integer beyond the double range (possible from the standard json
        # module, which keeps big integers exact) met float arithmetic.
        raise _fail(index, _overflow_reason(record)) from None
    return readings
