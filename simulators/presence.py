"""Per-device MQTT connections whose Last Will is the device's offline status.

A real device holds its own MQTT connection and registers a Last Will: a
retained QoS 1 ``{"state": "offline", "session": N}`` on its status topic.
If the device dies (power cut, crash, network loss) the broker publishes the
will, so presence is truthful even when nobody says goodbye.
:class:`DeviceConnections` gives every simulated device such a connection
(client id = device id, MQTT 5, clean start) and publishes the retained
``online`` status once the broker accepted the connection. If the
simulator is killed, the kernel closes every socket and the broker
publishes every will; if it hangs, the broker does so after 1.5 keepalives.

Going offline in a scenario (outage, flapping) sends an MQTT 5 DISCONNECT
with reason code 0x04 *Disconnect with Will Message*: the broker publishes
the will itself. Coming back reconnects with the next session. A clean stop
publishes the offline status explicitly, waits for its PUBACK, then sends a
normal DISCONNECT (which discards the will).

One thread and one selector drive all the paho clients, the way
``ingest/mqtt.py`` drives its client from the asyncio loop: paho's
``on_socket_open``/``on_socket_close``/``on_socket_(un)register_write``
callbacks (un)register each socket, readiness calls ``loop_read`` or
``loop_write``, and a tick calls ``loop_misc`` (keepalive). No thread per
device, and no socket pair per client (paho only makes one for its own
loops), so a device costs one file descriptor.

The publishing thread only enqueues commands (:meth:`DeviceConnections.online`,
:meth:`DeviceConnections.offline`); paho clients are touched by the
connection thread alone. Each device processes its commands in order, one
at a time: an ``offline`` waits until the preceding ``online`` has reached
the broker. A connection lost unexpectedly is re-established with backoff
and the next session (a real device would do the same).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import random
import resource
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from simulators.encoding import presence_payload
from simulators.mqtt import Endpoint, PublishCounts, publish_properties

__all__ = [
    "DEFAULT_DEVICE_CONNECTIONS_LIMIT",
    "DeviceConnections",
    "PresenceOptions",
    "ensure_fd_limit",
]

log = logging.getLogger(__name__)

DEFAULT_DEVICE_CONNECTIONS_LIMIT: Final = 2_000
"""Cities up to this many devices get one MQTT connection per device."""

_FD_SLACK: Final = 256
"""File descriptors kept for everything else (shared publisher, files, workers' pipes)."""

DISCONNECT_WITH_WILL: Final = 0x04


class _State(Enum):
    DOWN = "down"
    CONNECTING = "connecting"
    UP = "up"
    CLOSING = "closing"


@dataclass(frozen=True, slots=True)
class PresenceOptions:
    """Timing of the device connections.

    Attributes:
        keepalive_s: MQTT keepalive; the broker publishes the will of a hung
            simulator after 1.5 times this.
        connect_timeout_s: Deadline for the TCP connection and for the CONNACK.
        close_timeout_s: Deadline for the clean stop (offline statuses acknowledged).
        backoff_initial_s: First delay before re-establishing a lost connection.
        backoff_max_s: Longest such delay.
    """

    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    close_timeout_s: float = 15.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0


@dataclass(frozen=True, slots=True)
class _Command:
    online: bool
    session: int
    will: bool = False
    """For ``offline``: leave the status to the broker's will (else publish it and disconnect)."""
    retry: bool = False
    """An ``online`` that re-establishes a lost connection (the next session)."""


class _Device:
    """One device's connection and its queue of presence commands."""

    __slots__ = (
        "awaiting_mid",
        "client",
        "deadline",
        "failures",
        "id",
        "pending",
        "retry_at",
        "session",
        "sock",
        "state",
        "topic",
        "writing",
    )

    def __init__(
        self, device_id: str, topic: str, make_client: Callable[[_Device], paho.Client]
    ) -> None:
        self.id = device_id
        self.topic = topic
        self.client = make_client(self)
        self.state = _State.DOWN
        self.session = -1
        self.pending: collections.deque[_Command] = collections.deque()
        self.sock: socket.socket | None = None
        self.writing = False
        self.awaiting_mid: int | None = None
        """The status PUBLISH whose PUBACK must arrive before the next command."""
        self.deadline = math.inf
        self.retry_at = 0.0
        self.failures = 0


def ensure_fd_limit(needed: int) -> bool:
    """Raise the soft ``RLIMIT_NOFILE`` to ``needed`` (plus slack) if the hard limit allows.

    Returns:
        Whether the process may now open that many file descriptors.
    """
    want = needed + _FD_SLACK
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return True
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
            return False
        log.info("raised the open-files limit from %d to %d", soft, target)
    return target >= want


class DeviceConnections:
    """One MQTT 5 connection per device, with a retained offline status as its will.

    Use as a context manager from one thread (the publisher); the connections
    live in a thread of their own. Counts are final once closed.

    Args:
        endpoint: The broker.
        options: Keepalive and deadlines.
    """

    def __init__(self, endpoint: Endpoint, *, options: PresenceOptions | None = None) -> None:
        self._endpoint = endpoint
        self._options = options or PresenceOptions()
        self.counts = PublishCounts()
        """PUBLISHes of online and clean-stop offline statuses, and their PUBACKs."""
        self.statuses = 0
        """Status messages published by the simulator itself."""
        self.wills = 0
        """Offline statuses left to the broker: DISCONNECT with reason code 0x04."""
        self.reconnects = 0
        """Connections lost unexpectedly and re-established with the next session."""
        self._devices: dict[str, _Device] = {}
        self._inbox: collections.deque[tuple[str, str, _Command]] = collections.deque()
        self._dirty: set[_Device] = set()
        self._retrying: set[_Device] = set()
        self._rng = random.Random(0x5EED)  # backoff jitter only; never in payloads
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._closing = False
        self._abort = False
        self._clean = False
        self._thread = threading.Thread(target=self._run, name="device-connections", daemon=True)
        self._ssl: ssl.SSLContext | None = endpoint.ssl_context()
        self._status_props = publish_properties("application/json")
        will_props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
        will_props.ContentType = "application/json"
        self._will_props = will_props
        # MQTT 5 DISCONNECT reason 0x04: "disconnect, but publish my will".
        self._with_will = ReasonCode(PacketTypes.DISCONNECT, identifier=DISCONNECT_WITH_WILL)
        self._misc_interval_s = min(1.0, self._options.keepalive_s / 4.0)
        self._error: BaseException | None = None

    # -- the publishing thread's side ------------------------------------------

    def __enter__(self) -> DeviceConnections:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(abort=exc_type is not None)

    def online(self, device_id: str, topic: str, session: int) -> None:
        """Connect the device (will: offline with ``session``) and publish its online status."""
        self._send(device_id, topic, _Command(online=True, session=session))

    def offline(self, device_id: str, topic: str, session: int, *, will: bool) -> None:
        """Take the device offline.

        Args:
            device_id: The device.
            topic: Its status topic.
            session: The session going offline.
            will: ``True``: DISCONNECT with reason code 0x04, the broker
                publishes the will (outage, flapping). ``False``: publish the
                offline status, wait for its PUBACK, disconnect normally
                (a clean stop).
        """
        self._send(device_id, topic, _Command(online=False, session=session, will=will))

    def _send(self, device_id: str, topic: str, command: _Command) -> None:
        self._inbox.append((device_id, topic, command))
        with contextlib.suppress(BlockingIOError):  # a full pipe is already a wake-up
            self._wake_w.send(b"\0")

    def close(self, *, abort: bool = False) -> bool:
        """Finish the queued commands (clean-stop statuses acknowledged), then disconnect.

        Connections still open at ``close_timeout_s``, or at once with
        ``abort``, are closed without a DISCONNECT, so the broker publishes
        their wills (offline).

        Returns:
            Whether every device ended cleanly within the deadline.
        """
        if self._thread.is_alive():
            self._abort = abort
            self._closing = True
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")
            self._thread.join(self._options.close_timeout_s + 5.0)
        self._release()
        if self._error is not None:
            log.error("device connections failed: %s", self._error)
            return False
        return self._clean or not self._devices

    def _release(self) -> None:
        with contextlib.suppress(OSError):
            self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the connection thread -------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by close(), never lost
            log.exception("device connections stopped")
            self._error = exc
        finally:
            for device in self._devices.values():
                if device.sock is not None:
                    # Without DISCONNECT: the broker publishes the will (offline).
                    device.client._sock_close()  # paho has no public abort

    def _loop(self) -> None:
        next_misc = time.monotonic() + self._misc_interval_s
        close_deadline = math.inf
        while True:
            closing = self._closing  # read before draining: commands sent earlier are seen
            if closing and close_deadline == math.inf:
                close_deadline = time.monotonic() + self._options.close_timeout_s
            wake_at = min(next_misc, close_deadline)
            if self._retrying:
                wake_at = min(wake_at, *(d.retry_at for d in self._retrying))
            timeout = max(0.0, wake_at - time.monotonic())
            for key, mask in self._selector.select(timeout):
                device = key.data
                if device is None:
                    with contextlib.suppress(BlockingIOError):
                        while self._wake_r.recv(4096):
                            pass
                    continue
                client = device.client
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
                if mask & selectors.EVENT_READ:
                    client.loop_read()
            self._take_commands(closing=closing)
            now = time.monotonic()
            if now >= next_misc:
                next_misc = now + self._misc_interval_s
                self._tick(now)
            for device in [d for d in self._retrying if now >= d.retry_at]:
                self._retrying.discard(device)
                self._dirty.add(device)
            while self._dirty:
                self._advance(self._dirty.pop(), closing=closing)
            if closing and (self._abort or self._idle()):
                self._clean = not self._abort
                return
            if now >= close_deadline:
                busy = [d.id for d in self._devices.values() if d.state is not _State.DOWN]
                log.warning(
                    "%d device connections not closed within %.1f s (first: %s); "
                    "dropping them, the broker publishes their wills %s",
                    len(busy),
                    self._options.close_timeout_s,
                    ", ".join(busy[:3]),
                    [
                        (d.state, d.pending, d.awaiting_mid, d.sock, d.writing)
                        for d in self._devices.values()
                    ],
                )
                return

    def _idle(self) -> bool:
        return all(d.state is _State.DOWN and not d.pending for d in self._devices.values())

    def _take_commands(self, *, closing: bool) -> None:
        inbox = self._inbox
        while inbox:
            device_id, topic, command = inbox.popleft()
            device = self._devices.get(device_id)
            if device is None:
                device = self._devices[device_id] = _Device(device_id, topic, self._make_client)
            device.pending.append(command)
            self._dirty.add(device)
        if closing and self._retrying:
            self._dirty.update(self._retrying)  # _advance drops their reconnections
            self._retrying.clear()

    def _tick(self, now: float) -> None:
        for device in self._devices.values():
            if device.state is _State.UP or device.state is _State.CLOSING:
                device.client.loop_misc()  # PINGREQ when due; drops a silent broker
            elif device.state is _State.CONNECTING and now > device.deadline:
                log.warning(
                    "device %s: no CONNACK within %.1f s",
                    device.id,
                    self._options.connect_timeout_s,
                )
                device.client._sock_close()  # paho has no public abort
                self._lost(device)

    def _advance(self, device: _Device, *, closing: bool) -> None:
        """Start the device's next command if its connection is settled."""
        while device.pending:
            if device.state is _State.CONNECTING or device.state is _State.CLOSING:
                return
            if device.awaiting_mid is not None:
                return  # the online status first: a DISCONNECT now would lose its PUBACK
            command = device.pending[0]
            if closing and command.retry and device.state is _State.DOWN:
                # Its will went out when the connection was lost; reconnecting
                # only to say goodbye again is pointless.
                device.pending.clear()
                return
            if device.retry_at > time.monotonic():
                self._retrying.add(device)
                return
            self._retrying.discard(device)
            if command.online:
                if device.state is _State.UP:
                    device.pending.popleft()  # already online
                    continue
                if not self._connect(device, command):
                    return
                device.pending.popleft()
                return
            device.pending.popleft()
            if device.state is _State.DOWN:
                continue  # already offline: its will was published when it went down
            if command.will:
                device.state = _State.CLOSING
                device.client.disconnect(reasoncode=self._with_will)
                self.wills += 1
                return
            info = device.client.publish(
                device.topic,
                presence_payload("offline", device.session),
                qos=1,
                retain=True,
                properties=self._status_props,
            )
            self.counts.published[1] += 1
            self.statuses += 1
            device.state = _State.CLOSING
            device.awaiting_mid = info.mid
            return

    def _connect(self, device: _Device, command: _Command) -> bool:
        # The engine's sessions grow by one per reconnection; ours also grew on
        # every connection we re-established ourselves, so never go back.
        session = (
            max(command.session, device.session + 1) if device.session >= 0 else command.session
        )
        client = device.client
        client.will_set(
            device.topic,
            presence_payload("offline", session),
            qos=1,
            retain=True,
            properties=self._will_props,
        )
        device.session = session
        device.state = _State.CONNECTING
        device.deadline = time.monotonic() + self._options.connect_timeout_s
        try:
            client.connect(
                self._endpoint.host,
                self._endpoint.port,
                keepalive=self._options.keepalive_s,
                clean_start=True,
            )
        except OSError as exc:
            device.state = _State.DOWN
            delay = self._backoff(device)
            log.warning(
                "device %s cannot connect to %s:%d (%s); retry in %.1f s",
                device.id,
                self._endpoint.host,
                self._endpoint.port,
                exc,
                delay,
            )
            return False
        return True

    def _backoff(self, device: _Device) -> float:
        opts = self._options
        cap = min(opts.backoff_max_s, opts.backoff_initial_s * 2.0**device.failures)
        device.failures += 1
        delay = self._rng.uniform(cap / 2.0, cap)
        device.retry_at = time.monotonic() + delay
        self._retrying.add(device)
        return delay

    def _lost(self, device: _Device) -> None:
        """An unexpected end of the connection: come back with the next session."""
        was_up = device.state is _State.UP
        device.state = _State.DOWN
        device.awaiting_mid = None
        if self._closing:
            device.pending.clear()
            return
        if was_up:
            self.reconnects += 1
        # The will (offline, this session) is out; return as a new session.
        device.pending.appendleft(_Command(online=True, session=device.session + 1, retry=True))
        delay = self._backoff(device)
        log.warning(
            "device %s lost its connection; reconnecting in %.1f s as session %d",
            device.id,
            delay,
            device.session + 1,
        )

    # -- paho set-up and callbacks (connection thread only) ---------------------

    def _make_client(self, device: _Device) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=device.id, protocol=paho.MQTTv5, userdata=device
        )
        if self._endpoint.username is not None:
            client.username_pw_set(self._endpoint.username, self._endpoint.password)
        if self._ssl is not None:
            client.tls_set_context(self._ssl)
        client.connect_timeout = self._options.connect_timeout_s
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _on_socket_open(self, client: paho.Client, device: _Device, sock: Any) -> None:
        # paho does not set TCP_NODELAY; a small status would wait for the ACK delay.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        device.sock = sock
        device.writing = False
        self._selector.register(sock, selectors.EVENT_READ, device)

    def _on_socket_close(self, client: paho.Client, device: _Device, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        device.sock = None
        device.writing = False

    def _on_register_write(self, client: paho.Client, device: _Device, sock: Any) -> None:
        registered = device.sock
        if registered is sock and registered is not None and not device.writing:
            device.writing = True
            self._selector.modify(registered, selectors.EVENT_READ | selectors.EVENT_WRITE, device)

    def _on_unregister_write(self, client: paho.Client, device: _Device, sock: Any) -> None:
        registered = device.sock
        if registered is sock and registered is not None and device.writing:
            device.writing = False
            self._selector.modify(registered, selectors.EVENT_READ, device)

    def _on_connect(
        self, client: paho.Client, device: _Device, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        if reason.is_failure:
            log.warning("broker refused device %s: %s", device.id, reason)
            return  # the broker closes the socket; _on_disconnect retries
        device.failures = 0
        device.state = _State.UP
        info = client.publish(
            device.topic,
            presence_payload("online", device.session),
            qos=1,
            retain=True,
            properties=self._status_props,
        )
        self.counts.published[1] += 1
        self.statuses += 1
        device.awaiting_mid = info.mid

    def _on_disconnect(
        self, client: paho.Client, device: _Device, _f: Any, _reason: ReasonCode, _p: Any
    ) -> None:
        if device.state is _State.CLOSING:
            device.state = _State.DOWN
            device.awaiting_mid = None
        elif device.state is not _State.DOWN:
            self._lost(device)
        self._dirty.add(device)

    def _on_publish(
        self, client: paho.Client, device: _Device, mid: int, reason: ReasonCode, _p: Any
    ) -> None:
        if reason.is_failure:
            self.counts.failed += 1
        else:
            self.counts.acked[1] += 1
        if device.awaiting_mid != mid:
            return
        device.awaiting_mid = None
        if device.state is _State.CLOSING:
            client.disconnect()  # normal DISCONNECT: the broker discards the will
        else:
            self._dirty.add(device)
