"""The rule evaluator: readings in, raise/clear signals out.

Pure and single-threaded: no database, no broker, no sleeping. Time comes
from two places, on purpose:

* **Device time** (``Reading.ts``) drives everything that describes the data:
  windows, ``for:`` timers of threshold rules, gaps, correlations, chattering.
  A replay or backtest at 100x speed therefore gives the same alerts as live.
* **The injected clock** drives what happens when data does *not* arrive:
  ``no_data()``, ``offline()`` and the ``for:`` timers of the rules that use
  them (*timer rules*), evaluated by :meth:`Evaluator.tick`.

Deliberate choices (see ``docs/rules.md``):

* ``for: 5m`` needs continuous data: a gap between two evaluations longer than
  ``max_gap`` (the rule's, or the series' period times ``gap_factor``) restarts
  the timer. The period is the reading's SenML ``ut`` when given, otherwise
  the median spacing of the series' recent points.
* A late reading (older than the newest of its series) is inserted into the
  window in order, and learned by the baseline, but rules are *not*
  evaluated for it: an edge in the past would be a raise or clear that was
  already wrong when it was sent. The next in-order reading sees the
  corrected window. A reading at an instant already held replaces the value
  (redelivery is idempotent) and is not evaluated either.
* An offline device suppresses the alerts of its own channels: their signals
  are still produced (so the lifecycle can record them) but carry
  ``suppressed=True``. Only rules that use ``offline()`` are exempt.
* ``no_data(d)`` counts from the later of the series' last arrival and the
  evaluator's start, so a restart does not report every series silent at once.
* :meth:`Evaluator.warm_up` replays history silently: windows, baselines and
  ``for:`` timers are rebuilt, but nothing that happened in the past is
  emitted. Given the subjects of the alerts still open in storage, it emits
  only the differences (a condition now active without an open alert, an
  open alert whose condition has cleared).
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ingest import CommittedBatch, DecodedBatch, DeviceRef, Presence, Reading
from rules.baseline import BaselineBank
from rules.expr import Binary, Bool, Call, Dur, Name, Node, Num, Str, Unary, walk
from rules.kinds import KindResolver, prefix_kind_resolver
from rules.loader import RuleSet
from rules.model import Rule, Severity
from rules.window import SeriesWindow

__all__ = ["AlertSignal", "Clock", "Evaluator", "EvaluatorOptions", "SignalKind"]

SignalKind = Literal["raise", "clear"]
_MIN_HORIZON_S = 600.0
_NEG_INF = float("-inf")


class Clock(Protocol):
    """Wall time source (seconds since the epoch); inject a fake in tests."""

    def now(self) -> float:
        """The current time."""
        ...


@dataclass(frozen=True, slots=True)
class AlertSignal:
    """A condition of one rule on one subject became true (raise) or false (clear).

    Attributes:
        kind: ``raise`` or ``clear``.
        rule_id: The rule.
        subject: ``rule|device|channel`` (``rule|device|*`` for device rules,
            ``rule|district:<name>|*`` for correlation rules); the key of the
            one open alert per (rule, subject).
        severity: The rule's severity.
        message: The rendered message template.
        ts: Device time of the edge (clock time for timer rules).
        value: The series' value at the edge, if numeric.
        state: The series' state string at the edge, if any.
        device_id: The device, for series and device rules.
        channel: The channel, for series rules.
        district: The district.
        domain: The device's domain (empty for correlations).
        chattering: Latched once the condition cycled 3 times within 60 s.
        suppressed: The device was offline (suppression by design).
        devices: Devices that contributed (correlation rules).
        category: FIWARE Alert category.
        subcategory: FIWARE Alert subCategory.
    """

    kind: SignalKind
    rule_id: str
    subject: str
    severity: Severity
    message: str
    ts: float
    value: float | None = None
    state: str | None = None
    device_id: str | None = None
    channel: str | None = None
    district: str = ""
    domain: str = ""
    chattering: bool = False
    suppressed: bool = False
    devices: tuple[str, ...] = ()
    category: str = ""
    subcategory: str = ""


@dataclass(frozen=True, slots=True)
class EvaluatorOptions:
    """Tuning of the evaluator; the defaults suit the simulated city.

    Attributes:
        gap_factor: A gap longer than the series' period times this resets ``for:``.
        max_points: Hard cap on the points kept per series.
        utc_offset_s: Local time offset for hour-of-week baselines.
        baseline_min_samples: Samples per hour-of-week bucket before ``zscore()`` is defined.
        chatter_cycles: Raise/clear cycles that make a condition chattering...
        chatter_window_s: ...within this many seconds.
    """

    gap_factor: float = 2.5
    max_points: int = 4096
    utc_offset_s: float = 0.0
    baseline_min_samples: int = 20
    chatter_cycles: int = 3
    chatter_window_s: float = 60.0


class _Series:
    __slots__ = (
        "baseline",
        "channel",
        "corr",
        "device",
        "key",
        "last_arrival",
        "period_s",
        "rules",
        "slots",
        "unit",
        "window",
    )

    def __init__(self, device: _Device, channel: str, horizon_s: float, max_points: int) -> None:
        self.device = device
        self.channel = channel
        self.key = f"{device.ref.device_id}|{channel}"
        self.window = SeriesWindow(horizon_s, max_points)
        self.unit: str | None = None
        self.period_s: float | None = None
        self.last_arrival = _NEG_INF
        self.rules: list[_Compiled] = []
        self.slots: list[tuple[_Compiled, str, _Condition]] = []
        self.corr: list[tuple[_Compiled, int]] = []
        self.baseline = False


class _Device:
    __slots__ = ("channels", "kind", "presence", "ref", "rules", "session")

    def __init__(self, ref: DeviceRef, kind: str | None) -> None:
        self.ref = ref
        self.kind = kind
        self.presence: str | None = None
        self.session = -1
        self.channels: dict[str, _Series] = {}
        self.rules: list[_Compiled] = []


class _Condition:
    __slots__ = ("active", "chattering", "clears", "last_eval", "pending_since", "within")

    def __init__(self) -> None:
        self.active = False
        self.pending_since: float | None = None
        self.last_eval: float | None = None
        self.clears: deque[float] = deque()
        self.chattering = False
        self.within: dict[int, list[float]] = {}


_NO_COND = _Condition()


class _Correlation:
    __slots__ = ("active", "chattering", "clears", "last_true")

    def __init__(self, n: int) -> None:
        self.active = False
        self.chattering = False
        self.clears: deque[float] = deque()
        self.last_true: list[dict[str, tuple[float, str]]] = [{} for _ in range(n)]


Fn = Callable[["_Ctx"], Any]


class _Ctx:
    """What an expression sees while it is evaluated for one series (or device)."""

    __slots__ = ("clock_now", "cond", "device", "ev", "now", "series", "state", "value")

    def __init__(
        self,
        ev: Evaluator,
        device: _Device,
        series: _Series | None,
        *,
        now: float,
        clock_now: float,
        cond: _Condition,
    ) -> None:
        self.ev = ev
        self.device = device
        self.series = series
        self.now = now
        self.clock_now = clock_now
        self.cond = cond
        if series is None:
            self.value: float | None = None
            self.state: str | None = None
        else:
            self.value = series.window.last_value
            self.state = series.window.last_state

    def _series(self, channel: str | None) -> _Series | None:
        return self.series if channel is None else self.device.channels.get(channel)

    def aggregate(self, name: str, window_s: float, channel: str | None) -> float | None:
        s = self._series(channel)
        if s is None:
            return 0.0 if name == "count" else None
        return s.window.aggregate(name, self.now, window_s)

    def no_data(self, window_s: float, channel: str | None) -> bool:
        s = self._series(channel)
        last = max(s.last_arrival if s is not None else _NEG_INF, self.ev.started_at)
        return self.clock_now - last >= window_s

    def offline(self) -> bool:
        return self.device.presence == "offline"

    def zscore(self, channel: str | None) -> float | None:
        s = self._series(channel)
        if s is None:
            return None
        value = s.window.last_value
        if value is None:
            return None
        return self.ev.baselines.zscore(s.key, self.now, value)

    def within(self, slot: int, window_s: float, conds: Sequence[Fn]) -> bool:
        marks = self.cond.within.get(slot)
        if marks is None:
            marks = self.cond.within[slot] = [_NEG_INF] * len(conds)
        for i, cond in enumerate(conds):
            if cond(self):
                marks[i] = self.now
        horizon = self.now - window_s
        return all(m >= horizon for m in marks)


_CMP: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
_ARITH: dict[str, Callable[[float, float], float]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
}


def _compile(node: Node, slots: list[int]) -> Fn:
    """An expression as a closure over an evaluation context.

    Unknown values (no data, a state where a number is needed, a window with
    no points) are ``None``: arithmetic on them gives ``None`` and any
    comparison with them is false.
    """
    if isinstance(node, Num | Dur | Str | Bool):
        const: Any = node.seconds if isinstance(node, Dur) else node.value
        return lambda _c: const
    if isinstance(node, Name):
        if node.name == "value":
            return lambda c: c.value
        return lambda c: c.state
    if isinstance(node, Unary):
        inner = _compile(node.operand, slots)
        if node.op == "not":
            return lambda c: not inner(c)
        return lambda c: None if (v := inner(c)) is None else -v
    if isinstance(node, Binary):
        return _compile_binary(node, slots)
    return _compile_call(node, slots)


def _compile_binary(node: Binary, slots: list[int]) -> Fn:
    left, right = _compile(node.left, slots), _compile(node.right, slots)
    op = node.op
    if op == "and":
        return lambda c: bool(left(c)) and bool(right(c))
    if op == "or":
        return lambda c: bool(left(c)) or bool(right(c))
    if op in _CMP:
        cmp = _CMP[op]

        def compare(c: _Ctx) -> bool:
            a = left(c)
            if a is None:
                return False
            b = right(c)
            return b is not None and cmp(a, b)

        return compare
    if op == "/":

        def divide(c: _Ctx) -> float | None:
            a, b = left(c), right(c)
            if a is None or b is None or b == 0:
                return None
            return float(a / b)

        return divide
    arith = _ARITH[op]

    def arithmetic(c: _Ctx) -> float | None:
        a, b = left(c), right(c)
        return None if a is None or b is None else arith(a, b)

    return arithmetic


def _str_arg(node: Call, i: int) -> str | None:
    if len(node.args) > i:
        arg = node.args[i]
        return arg.value if isinstance(arg, Str) else None
    return None


def _compile_call(node: Call, slots: list[int]) -> Fn:
    f = node.func
    if f == "offline":
        return lambda c: c.offline()
    if f == "zscore":
        zch = _str_arg(node, 0)
        return lambda c: c.zscore(zch)
    if f == "abs":
        inner = _compile(node.args[0], slots)
        return lambda c: None if (v := inner(c)) is None else abs(v)
    first = node.args[0]
    window_s = first.seconds if isinstance(first, Dur) else 0.0
    if f == "within":
        slot = len(slots)
        slots.append(slot)
        conds = [_compile(a, slots) for a in node.args[1:]]
        return lambda c: c.within(slot, window_s, conds)
    channel = _str_arg(node, 1)
    if f == "no_data":
        return lambda c: c.no_data(window_s, channel)
    return lambda c: c.aggregate(f, window_s, channel)


class _Compiled:
    """A rule with its expressions compiled."""

    __slots__ = ("baseline_channels", "clear_fn", "conds", "rule", "timers", "when_fn", "windows")

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        slots: list[int] = []
        self.when_fn: Fn | None = _compile(rule.when, slots) if rule.when is not None else None
        self.clear_fn: Fn | None = (
            _compile(rule.clear_when, slots) if rule.clear_when is not None else None
        )
        self.conds: list[Fn] = []
        if rule.correlation is not None:
            self.conds = [_compile(c.when, slots) for c in rule.correlation.conditions]
        self.timers = rule.uses_timers
        self.windows = rule.windows()
        self.baseline_channels = rule.baseline_channels()


class _Missing:
    """Renders an unknown placeholder value as ``n/a`` whatever its format spec."""

    def __format__(self, spec: str) -> str:
        return "n/a"


_MISSING = _Missing()


def _render(template: str, fields: dict[str, Any]) -> str:
    values = {k: (_MISSING if v is None else v) for k, v in fields.items()}
    try:
        return template.format_map(values)
    except (ValueError, TypeError):
        # a numeric format spec met a string value: fall back to plain text
        return template.format_map({k: str(v) for k, v in fields.items()})


class Evaluator:
    """Evaluates rules over readings and presence; returns raise/clear signals.

    Args:
        rules: A loaded rule set or rules.
        clock: Wall time, for ``no_data``/``offline`` timers and arrival times.
        options: Tuning.
        kind_of: Resolves a device's kind (default: by device id prefix).
    """

    def __init__(
        self,
        rules: RuleSet | Iterable[Rule],
        clock: Clock,
        *,
        options: EvaluatorOptions | None = None,
        kind_of: KindResolver | None = None,
    ) -> None:
        self.clock = clock
        self.options = options or EvaluatorOptions()
        self.kind_of = kind_of or prefix_kind_resolver()
        self.started_at = clock.now()
        self.baselines = BaselineBank(
            utc_offset_s=self.options.utc_offset_s,
            min_samples=self.options.baseline_min_samples,
        )
        self._devices: dict[str, _Device] = {}
        self._series: dict[tuple[str, str], _Series] = {}
        self._conditions: dict[str, _Condition] = {}
        self._correlations: dict[str, _Correlation] = {}
        self._district_now: dict[str, float] = {}
        self._out: list[AlertSignal] = []
        self._silent = False
        self._set_rules(tuple(rules))

    # -- rules ---------------------------------------------------------------

    def _set_rules(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self._compiled = [_Compiled(r) for r in rules]
        self._series_rules = [c for c in self._compiled if c.rule.kind == "series"]
        self._device_rules = [c for c in self._compiled if c.rule.kind == "device"]
        self._corr_rules = [c for c in self._compiled if c.rule.kind == "correlation"]
        # candidates by channel, so the first sight of a series checks a few rules, not all
        self._by_channel: dict[str, list[_Compiled]] = {}
        for c in self._series_rules:
            for ch in c.rule.subject.channels:
                self._by_channel.setdefault(ch, []).append(c)
        self._corr_by_channel: dict[str, list[tuple[_Compiled, int]]] = {}
        for c in self._corr_rules:
            assert c.rule.correlation is not None
            for i, cond in enumerate(c.rule.correlation.conditions):
                for ch in cond.subject.channels:
                    self._corr_by_channel.setdefault(ch, []).append((c, i))
        need: dict[str | None, float] = {}
        for rule in rules:
            for named, seconds in rule.windows().items():
                need[named] = max(need.get(named, 0.0), seconds)
        self._named_need = need
        self._baseline_named = {
            ch for c in self._compiled for ch in c.baseline_channels if ch is not None
        }
        self._presence_rules = frozenset(
            r.id
            for r in rules
            if any(
                isinstance(n, Call) and n.func == "offline"
                for e in r.expressions()
                for n in walk(e)
            )
        )
        self._timer_series: dict[str, _Series] = {}
        self._ruled_devices: dict[str, _Device] = {}
        for device in self._devices.values():
            self._match_device(device)
            for series in device.channels.values():
                self._match_series(series)

    def replace_rules(self, rules: RuleSet | Iterable[Rule]) -> list[AlertSignal]:
        """Swap in a new rule set (hot reload) keeping windows, baselines and timers.

        Conditions of rules that still exist keep their state; conditions of
        removed rules, or whose subject no longer matches, are cleared.

        Returns:
            Clear signals for the active conditions that no longer exist.
        """
        previous = {r.id: r for r in self.rules}
        self._set_rules(tuple(rules))
        valid: set[str] = set()
        for device in self._devices.values():
            for c in device.rules:
                valid.add(f"{c.rule.id}|{device.ref.device_id}|*")
            for series in device.channels.values():
                for c in series.rules:
                    valid.add(f"{c.rule.id}|{series.key}")
        corr_ids = {c.rule.id for c in self._corr_rules}
        out: list[AlertSignal] = []
        for key in list(self._conditions):
            if key not in valid:
                cond = self._conditions.pop(key)
                if cond.active:
                    rule_id, device_id, channel = key.split("|")
                    out.append(self._orphan_clear(key, previous[rule_id], device_id, channel))
        for key in list(self._correlations):
            if key.split("|", 1)[0] not in corr_ids:
                corr = self._correlations.pop(key)
                if corr.active:
                    rule = previous[key.split("|", 1)[0]]
                    out.append(self._orphan_clear(key, rule, None, None))
        return out

    def _orphan_clear(
        self, key: str, rule: Rule, device_id: str | None, channel: str | None
    ) -> AlertSignal:
        return AlertSignal(
            "clear",
            rule.id,
            key,
            rule.severity,
            f"{rule.name}: rule removed or no longer applies",
            self.clock.now(),
            device_id=device_id,
            channel=None if channel in (None, "*") else channel,
            category=rule.category,
            subcategory=rule.subcategory,
        )

    def _match_device(self, device: _Device) -> None:
        ref = device.ref
        device.rules = [
            c
            for c in self._device_rules
            if c.rule.subject.matches(ref.domain, ref.district, device.kind, ref.device_id, "")
        ]
        if device.rules:
            self._ruled_devices[ref.device_id] = device
        else:
            self._ruled_devices.pop(ref.device_id, None)

    def _match_series(self, series: _Series) -> None:
        ref, kind, ch = series.device.ref, series.device.kind, series.channel
        series.rules = [
            c
            for c in self._by_channel.get(ch, ())
            if c.rule.subject.matches(ref.domain, ref.district, kind, ref.device_id, ch)
        ]
        series.slots = []
        for c in series.rules:
            key = f"{c.rule.id}|{series.key}"
            series.slots.append((c, key, self._condition(key)))
        if any(c.timers for c in series.rules):
            self._timer_series[series.key] = series  # tick() visits only these
        else:
            self._timer_series.pop(series.key, None)
        series.corr = []
        for c, i in self._corr_by_channel.get(ch, ()):
            assert c.rule.correlation is not None
            cond = c.rule.correlation.conditions[i]
            if cond.subject.matches(ref.domain, ref.district, kind, ref.device_id, ch):
                series.corr.append((c, i))
        horizon = self._named_need.get(ch, 0.0)
        for c in series.rules:
            horizon = max(horizon, c.windows.get(None, 0.0))
        for c, _ in series.corr:
            assert c.rule.correlation is not None
            horizon = max(horizon, c.windows.get(None, 0.0), c.rule.correlation.within_s)
        series.window.horizon_s = max(horizon, _MIN_HORIZON_S)
        series.baseline = ch in self._baseline_named or any(
            None in c.baseline_channels for c in series.rules
        )

    def _device(self, ref: DeviceRef) -> _Device:
        device = self._devices.get(ref.device_id)
        if device is None:
            device = _Device(ref, self.kind_of(ref))
            self._devices[ref.device_id] = device
            self._match_device(device)
        return device

    def _get_series(self, ref: DeviceRef, channel: str) -> _Series:
        key = (ref.device_id, channel)
        series = self._series.get(key)
        if series is None:
            device = self._device(ref)
            series = _Series(device, channel, _MIN_HORIZON_S, self.options.max_points)
            device.channels[channel] = series
            self._series[key] = series
            self._match_series(series)
        return series

    # -- inputs --------------------------------------------------------------

    def on_readings(self, readings: Sequence[Reading]) -> list[AlertSignal]:
        """Evaluate a committed batch of readings (in receive order).

        Returns:
            The raise and clear signals, in evaluation order.
        """
        arrival = self.clock.now()
        out: list[AlertSignal] = []
        self._out = out
        for reading in readings:
            self._reading(reading, arrival)
        return out

    def _reading(self, r: Reading, arrival: float) -> None:
        series = self._get_series(r.device, r.channel)
        placement = series.window.add(r.ts, r.value, r.state)
        if placement == "duplicate":
            return
        if series.baseline and r.value is not None and placement == "late":
            self.baselines.update(series.key, r.ts, r.value)
        if placement == "late":
            return
        series.last_arrival = arrival
        if r.update_period_s:
            series.period_s = r.update_period_s
        if r.unit is not None:
            series.unit = r.unit
        district = r.device.district
        if r.ts > self._district_now.get(district, _NEG_INF):
            self._district_now[district] = r.ts
        if series.slots:
            period = series.period_s or series.window.typical_interval()
            ctx = _Ctx(self, series.device, series, now=r.ts, clock_now=arrival, cond=_NO_COND)
            for c, key, cond in series.slots:
                self._eval_series(c, series, key, cond, ctx, ts=r.ts, period=period, tick=False)
        for c, i in series.corr:
            self._eval_correlation_condition(c, i, series, r.ts, arrival)
        if series.baseline and r.value is not None:
            self.baselines.update(series.key, r.ts, r.value)

    def on_batch(self, batch: DecodedBatch | CommittedBatch) -> list[AlertSignal]:
        """Evaluate one batch of decoded readings: its readings, then its presence changes.

        Readings go first: a device's last readings and its will message
        (offline) often share a batch, and those readings were taken while
        it was still online.
        """
        out = self.on_readings(batch.readings)
        out += self.on_presence(batch.presences)
        return out

    def on_presence(self, presences: Sequence[Presence]) -> list[AlertSignal]:
        """Apply presence changes; a status from an older session is ignored.

        Returns:
            Signals of device rules (``offline()``) that changed.
        """
        now = self.clock.now()
        out: list[AlertSignal] = []
        self._out = out
        for p in presences:
            device = self._device(p.device)
            if p.session < device.session:
                continue
            device.session = p.session
            device.presence = p.state
            for c in device.rules:
                self._eval_device(c, device, now)
        return out

    def tick(self, now: float | None = None) -> list[AlertSignal]:
        """Evaluate what changes without data: ``no_data``, ``offline``, correlations.

        Args:
            now: Clock time (default: the clock's).

        Returns:
            The signals that became due.
        """
        clock_now = self.clock.now() if now is None else now
        out: list[AlertSignal] = []
        self._out = out
        for device in self._ruled_devices.values():
            for c in device.rules:
                self._eval_device(c, device, clock_now)
        for series in self._timer_series.values():
            now_d = series.window.last_ts or clock_now
            ctx = _Ctx(self, series.device, series, now=now_d, clock_now=clock_now, cond=_NO_COND)
            for c, key, cond in series.slots:
                if c.timers:
                    self._eval_series(
                        c, series, key, cond, ctx, ts=clock_now, period=None, tick=True
                    )
        for key, corr in self._correlations.items():
            if corr.active:
                rule_id, _, rest = key.partition("|")
                district = rest.split("|")[0].removeprefix("district:")
                found = next((x for x in self._corr_rules if x.rule.id == rule_id), None)
                if found is not None:
                    now_d = self._district_now[district]
                    self._check_correlation(found, key, corr, district, now_d)
        return out

    def warm_up(
        self, readings: Iterable[Reading], *, open_subjects: Collection[str] | None = None
    ) -> list[AlertSignal]:
        """Rebuild windows, baselines and timers from stored readings, silently.

        Readings are replayed in device-time order with their own time as the
        arrival time. Conditions that rose and fell in the past emit nothing;
        a ``for:`` timer that had run 9 of 10 minutes keeps running.

        Args:
            readings: Historic readings (any order).
            open_subjects: Subjects of the alerts open in storage. When given,
                the differences are returned: a raise for a condition active
                now without an open alert, a clear for an open alert whose
                condition is now inactive. When ``None``, nothing is returned.

        Returns:
            The reconciling signals (see ``open_subjects``).
        """
        self._silent = True
        try:
            self._out = []
            for r in sorted(readings, key=lambda x: x.ts):
                self._reading(r, r.ts)
        finally:
            self._silent = False
        if open_subjects is None:
            return []
        out: list[AlertSignal] = []
        self._out = out
        wanted = set(open_subjects)
        for (_, _), series in self._series.items():
            for c in series.rules:
                key = f"{c.rule.id}|{series.key}"
                cond = self._conditions.get(key)
                if cond is None:
                    continue
                now = series.window.last_ts or self.clock.now()
                if cond.active and key not in wanted:
                    self._emit(
                        "raise",
                        c.rule,
                        key,
                        chattering=cond.chattering,
                        ts=now,
                        device=series.device,
                        series=series,
                    )
                elif not cond.active and key in wanted:
                    self._emit(
                        "clear",
                        c.rule,
                        key,
                        chattering=cond.chattering,
                        ts=now,
                        device=series.device,
                        series=series,
                    )
        return out

    # -- evaluation ----------------------------------------------------------

    def _condition(self, key: str) -> _Condition:
        cond = self._conditions.get(key)
        if cond is None:
            cond = self._conditions[key] = _Condition()
        return cond

    def _eval_series(
        self,
        c: _Compiled,
        series: _Series,
        key: str,
        cond: _Condition,
        ctx: _Ctx,
        *,
        ts: float,
        period: float | None,
        tick: bool,
    ) -> None:
        rule = c.rule
        # timer rules run on the clock; threshold rules on device time
        base = ctx.clock_now if c.timers else ts
        if not tick and not c.timers:
            gap = rule.max_gap_s
            if gap is None and period is not None:
                gap = period * self.options.gap_factor
            if cond.last_eval is not None and gap is not None and ts - cond.last_eval > gap:
                cond.pending_since = None  # data gap: a for: timer must start over
            cond.last_eval = ts
        ctx.cond = cond
        self._step(c, cond, ctx, key=key, base=base, device=series.device, series=series)

    def _eval_device(self, c: _Compiled, device: _Device, now: float) -> None:
        key = f"{c.rule.id}|{device.ref.device_id}|*"
        cond = self._condition(key)
        ctx = _Ctx(self, device, None, now=now, clock_now=now, cond=cond)
        self._step(c, cond, ctx, key=key, base=now, device=device, series=None)

    def _step(
        self,
        c: _Compiled,
        cond: _Condition,
        ctx: _Ctx,
        *,
        key: str,
        base: float,
        device: _Device,
        series: _Series | None,
    ) -> None:
        rule = c.rule
        assert c.when_fn is not None
        if not cond.active:
            if c.when_fn(ctx):
                if cond.pending_since is None:
                    cond.pending_since = base
                if base - cond.pending_since >= rule.for_s:
                    cond.active = True
                    cond.pending_since = None
                    self._emit(
                        "raise",
                        rule,
                        key,
                        chattering=cond.chattering,
                        ts=base,
                        device=device,
                        series=series,
                    )
            else:
                cond.pending_since = None
            return
        clear = c.clear_fn(ctx) if c.clear_fn is not None else not c.when_fn(ctx)
        if clear:
            cond.active = False
            cond.chattering = self._chatter(cond.clears, cond.chattering, base)
            self._emit(
                "clear",
                rule,
                key,
                chattering=cond.chattering,
                ts=base,
                device=device,
                series=series,
            )

    def _chatter(self, clears: deque[float], latched: bool, now: float) -> bool:
        clears.append(now)
        horizon = now - self.options.chatter_window_s
        while clears and clears[0] < horizon:
            clears.popleft()
        return latched or len(clears) >= self.options.chatter_cycles

    def _emit(
        self,
        kind: SignalKind,
        rule: Rule,
        key: str,
        *,
        chattering: bool,
        ts: float,
        device: _Device,
        series: _Series | None,
    ) -> None:
        if self._silent:
            return
        ref = device.ref
        value = series.window.last_value if series is not None else None
        state = series.window.last_state if series is not None else None
        fields = {
            "rule": rule.id,
            "name": rule.name,
            "severity": rule.severity,
            "device": ref.device_id,
            "channel": series.channel if series is not None else None,
            "district": ref.district,
            "domain": ref.domain,
            "kind": device.kind,
            "value": value,
            "state": state,
            "unit": series.unit if series is not None else None,
        }
        suppressed = device.presence == "offline" and rule.id not in self._presence_rules
        self._out.append(
            AlertSignal(
                kind=kind,
                rule_id=rule.id,
                subject=key,
                severity=rule.severity,
                message=_render(rule.message, fields),
                ts=ts,
                value=value,
                state=state,
                device_id=ref.device_id,
                channel=series.channel if series is not None else None,
                district=ref.district,
                domain=ref.domain,
                chattering=chattering,
                suppressed=suppressed,
                category=rule.category,
                subcategory=rule.subcategory,
            )
        )

    # -- correlation ---------------------------------------------------------

    def _eval_correlation_condition(
        self, c: _Compiled, index: int, series: _Series, ts: float, clock_now: float
    ) -> None:
        district = series.device.ref.district
        key = f"{c.rule.id}|district:{district}|*"
        corr = self._correlations.get(key)
        if corr is None:
            corr = self._correlations[key] = _Correlation(len(c.conds))
        scratch = self._condition(f"{c.rule.id}#{index}|{series.key}")
        ctx = _Ctx(self, series.device, series, now=ts, clock_now=clock_now, cond=scratch)
        if c.conds[index](ctx):
            corr.last_true[index][series.key] = (ts, series.device.ref.device_id)
        self._check_correlation(c, key, corr, district, ts)

    def _check_correlation(
        self, c: _Compiled, key: str, corr: _Correlation, district: str, now: float
    ) -> None:
        correlation = c.rule.correlation
        assert correlation is not None
        horizon = now - correlation.within_s
        devices: set[str] = set()
        satisfied = True
        for marks in corr.last_true:
            for series_key in [k for k, (t, _) in marks.items() if t < horizon]:
                del marks[series_key]
            if not marks:
                satisfied = False
            devices.update(d for _, d in marks.values())
        if satisfied and not corr.active:
            corr.active = True
            self._emit_correlation(
                "raise", c.rule, key, corr=corr, district=district, now=now, devices=devices
            )
        elif corr.active and not satisfied:
            corr.active = False
            corr.chattering = self._chatter(corr.clears, corr.chattering, now)
            self._emit_correlation(
                "clear", c.rule, key, corr=corr, district=district, now=now, devices=devices
            )

    def _emit_correlation(
        self,
        kind: SignalKind,
        rule: Rule,
        key: str,
        *,
        corr: _Correlation,
        district: str,
        now: float,
        devices: set[str],
    ) -> None:
        if self._silent:
            return
        names = tuple(sorted(devices))
        fields = {
            "rule": rule.id,
            "name": rule.name,
            "severity": rule.severity,
            "district": district,
            "devices": ", ".join(names),
        }
        self._out.append(
            AlertSignal(
                kind=kind,
                rule_id=rule.id,
                subject=key,
                severity=rule.severity,
                message=_render(rule.message, fields),
                ts=now,
                district=district,
                chattering=corr.chattering,
                devices=names,
                category=rule.category,
                subcategory=rule.subcategory,
            )
        )

    # -- introspection -------------------------------------------------------

    def active_subjects(self) -> frozenset[str]:
        """Subjects whose condition is active now."""
        series = {k for k, c in self._conditions.items() if c.active and "#" not in k}
        return frozenset(series | {k for k, c in self._correlations.items() if c.active})

    def pending(self, subject: str) -> float | None:
        """When the ``for:`` timer of ``subject`` started, if one is running."""
        cond = self._conditions.get(subject)
        return None if cond is None else cond.pending_since

    @property
    def series_count(self) -> int:
        """Number of series seen."""
        return len(self._series)
