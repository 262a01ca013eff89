"""The simulation engine: a pure, deterministic stream of MQTT messages in simulated time.

:class:`Simulation` steps every device of a city (or of one partition of it)
on its own period with its own jitter, samples its generator, applies the
scenario's effects and faults, and yields :class:`SimMessage` values in
simulated-time order. It never reads the wall clock and never does I/O:
pacing and publishing are the shell's job (``simulators.runner``), so the
same seed gives the same bytes at any speed, and tests need no broker.

Noise is keyed by (seed, device, report number), so a device's feed does
not depend on the partition it is simulated in, nor on the city's size.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Literal

from simulators.encoding import content_type_for, encode_reading, presence_payload
from simulators.environment import Environment
from simulators.generators import GENERATORS, DeviceContext, Value, build_contexts
from simulators.model import CityModel, DeviceSpec
from simulators.rng import Draws
from simulators.scenario import Fault, ScenarioPlan

__all__ = ["SimMessage", "Simulation", "corrupt_payload"]

MessageKind = Literal["reading", "status"]

# Event codes, in the order they run when they fall on the same instant.
_OFFLINE: Final = 0
_ONLINE: Final = 1
_REPORT: Final = 2
_EXTRA_REPORT: Final = 3
_RELEASE: Final = 4


@dataclass(frozen=True, slots=True)
class SimMessage:
    """One message to publish.

    Attributes:
        t: Simulated time at which it is published (epoch seconds).
        topic: MQTT topic.
        payload: Payload bytes.
        qos: MQTT QoS.
        retain: MQTT retain flag (presence only).
        content_type: MQTT 5 content type, or ``None``.
        device: Device id.
        kind: ``reading`` or ``status``.
        session: Presence session (status messages), else 0.
        presence: ``online`` or ``offline`` (status messages), else empty.
    """

    t: float
    topic: str
    payload: bytes
    qos: int
    retain: bool
    content_type: str | None
    device: str
    kind: MessageKind = "reading"
    session: int = 0
    presence: str = ""


class _DeviceState:
    """Mutable per-device state of a run."""

    __slots__ = (
        "ctx",
        "faults",
        "generator",
        "held",
        "index",
        "last",
        "online",
        "seq",
        "session",
        "stuck",
    )

    def __init__(
        self, index: int, ctx: DeviceContext, faults: tuple[Fault, ...], session: int
    ) -> None:
        self.index = index
        self.ctx = ctx
        self.generator = GENERATORS[ctx.kind.generator]
        self.faults = faults
        self.seq = 0
        self.session = session
        self.online = False
        self.last: tuple[Value, ...] | None = None
        self.stuck: tuple[Value, ...] | None = None
        self.held: SimMessage | None = None


_MALFORMED_VARIANTS: Final = 6


def corrupt_payload(payload: bytes, variant: int) -> bytes:
    """A deterministic malformed version of ``payload`` (fault ``malformed``).

    Variants: truncated JSON, a NaN literal, bytes that are not UTF-8, a
    must-understand label (SenML) or a text timestamp (flat), a time of the
    wrong type, an empty payload.
    """
    v = variant % _MALFORMED_VARIANTS
    if v == 0:
        return payload[: max(1, len(payload) // 2)]
    if v == 1:
        return payload.replace(b"}", b',"nan":NaN}', 1)
    if v == 2:
        return b"\xff\xfe" + payload[:8]
    if v == 3:
        if payload.startswith(b"["):
            return payload.replace(b"{", b'{"x_":1,', 1)
        return payload.replace(b'"ts":', b'"ts":"yesterday","ts_":', 1)
    if v == 4:
        if payload.startswith(b"["):
            return payload.replace(b'"bt":', b'"bt":"not-a-time","x":', 1)
        return payload.replace(b'"ts":', b'"ts":{"nested":[1,2]},"x":', 1)
    return b""


class Simulation:
    """A deterministic run of a city (or of partition ``part`` of ``parts``).

    Args:
        model: The city.
        seed: The run's seed.
        start: Simulated start, epoch seconds.
        plan: Compiled scenarios (effects, outages, faults), if any.
        part: This partition's number, ``0 <= part < parts``.
        parts: Number of partitions; device ``i`` belongs to partition ``i % parts``.
        qos: Override the QoS of every reading.
    """

    def __init__(
        self,
        model: CityModel,
        *,
        seed: int,
        start: float,
        plan: ScenarioPlan | None = None,
        part: int = 0,
        parts: int = 1,
        qos: int | None = None,
    ) -> None:
        self.model = model
        self.seed = seed
        self.start = start
        self.plan = plan or ScenarioPlan()
        self._qos = qos
        self.env = Environment(
            model,
            seed=seed,
            incidents=self.plan.incidents,
            rain_events=self.plan.rain,
            quakes=self.plan.quakes,
        )
        devices = [d for i, d in enumerate(model.devices) if i % parts == part]
        contexts = build_contexts(model, devices, self.plan.effects)
        base_session = int(start)  # a later run starts later: its sessions are never stale
        self._states = [
            _DeviceState(i, contexts[d.id], self.plan.faults.get(d.id, ()), base_session)
            for i, d in enumerate(devices)
        ]
        self._heap: list[tuple[float, int, int]] = []
        self.now = start
        for state in self._states:
            self._schedule_device(state)
        heapq.heapify(self._heap)

    @property
    def devices(self) -> list[DeviceSpec]:
        """The devices simulated here."""
        return [s.ctx.device for s in self._states]

    def _schedule_device(self, state: _DeviceState) -> None:
        device = state.ctx.device
        i = state.index
        heap = self._heap
        heap.append((self.start, i, _ONLINE))
        first = Draws(self.seed, device.key, 0x5EED).uniform()
        heap.append((self.start + device.period_s * first, i, _REPORT))
        for a, b in self.plan.offline.get(device.id, ()):
            heap.append((max(a, self.start), i, _OFFLINE))
            heap.append((max(b, self.start), i, _ONLINE))
        for effect in self.plan.effects.get(device.id, ()):
            if effect.report and effect.start >= self.start:
                heap.append((effect.start, i, _EXTRA_REPORT))
        for fault in state.faults:
            if fault.kind == "out-of-order":
                heap.append((fault.end, i, _RELEASE))

    def run(self, until: float = math.inf) -> Iterator[SimMessage]:
        """Yield messages in simulated-time order up to (not including) ``until``."""
        heap = self._heap
        states = self._states
        while heap and heap[0][0] < until:
            t, i, action = heapq.heappop(heap)
            self.now = t
            state = states[i]
            if action == _REPORT:
                period = state.ctx.device.period_s
                jitter = state.ctx.device.jitter
                draws = Draws(self.seed, state.ctx.device.key, state.seq)
                state.seq += 1
                heapq.heappush(
                    heap, (t + period * (1.0 + jitter * (2.0 * draws.uniform() - 1.0)), i, _REPORT)
                )
                if state.online:
                    yield from self._report(state, t, draws)
            elif action == _EXTRA_REPORT:
                draws = Draws(self.seed, state.ctx.device.key, state.seq)
                state.seq += 1
                draws.uniform()
                if state.online:
                    yield from self._report(state, t, draws)
            elif action == _ONLINE:
                if not state.online:
                    if t > self.start:
                        state.session += 1
                    state.online = True
                    yield self._status(state, t, "online")
            elif action == _OFFLINE:
                if state.online:
                    state.online = False
                    yield self._status(state, t, "offline")
            elif state.held is not None:  # _RELEASE
                held, state.held = state.held, None
                yield held
        self.now = max(self.now, until) if until != math.inf else self.now

    def finish(self) -> list[SimMessage]:
        """Messages for a clean end: held messages, then every online device going offline."""
        out: list[SimMessage] = []
        for state in self._states:
            if state.held is not None:
                out.append(state.held)
                state.held = None
        for state in self._states:
            if state.online:
                state.online = False
                out.append(self._status(state, self.now, "offline"))
        return out

    def _status(self, state: _DeviceState, t: float, presence: str) -> SimMessage:
        device = state.ctx.device
        return SimMessage(
            t,
            device.status_topic,
            presence_payload(presence, state.session),
            1,
            True,
            "application/json",
            device.id,
            "status",
            state.session,
            presence,
        )

    def _report(self, state: _DeviceState, t: float, draws: Draws) -> Iterator[SimMessage]:
        ctx = state.ctx
        device = ctx.device
        values = state.generator(ctx, self.env, t, draws)
        ts = t
        duplicate = out_of_order = False
        malformed = 0.0
        for fault in state.faults:
            if not fault.active(t):
                if fault.kind == "stuck":
                    state.stuck = None
                continue
            kind = fault.kind
            if kind == "dropout":
                return
            if kind == "stuck":
                if state.stuck is None:
                    state.stuck = state.last if state.last is not None else values
                values = state.stuck
            elif kind == "drift":
                factor = 1.0 + fault.magnitude * (t - fault.start) / 3600.0
                values = tuple(_scaled(v, factor) for v in values)
            elif kind == "noise-burst":
                values = tuple(_noisy(v, fault.magnitude, draws) for v in values)
            elif kind == "clock-skew":
                ts += fault.magnitude
            elif kind == "duplicate":
                duplicate = True
            elif kind == "out-of-order":
                out_of_order = True
            elif kind == "malformed":
                malformed = fault.magnitude
        state.last = values
        payload = encode_reading(
            ctx.kind.channels, values, ts, encoding=device.encoding, period_s=device.period_s
        )
        if malformed and draws.uniform() < malformed:
            payload = corrupt_payload(payload, state.seq)
        message = SimMessage(
            t,
            device.topic,
            payload,
            device.qos if self._qos is None else self._qos,
            False,
            content_type_for(device.encoding),
            device.id,
        )
        if out_of_order:
            if state.held is None:
                state.held = message
                return
            held, state.held = state.held, None
            yield message
            yield held
            return
        yield message
        if duplicate:
            yield message


def _scaled(value: Value, factor: float) -> Value:
    if isinstance(value, bool | str):
        return value
    return round(value * factor, 3)


def _noisy(value: Value, amplitude: float, draws: Draws) -> Value:
    if isinstance(value, bool | str):
        return value
    return round(value + amplitude * max(abs(value), 1.0) * draws.gauss(), 3)
