"""paho-mqtt driven by the asyncio loop, with manual acknowledgement.

aiomqtt acknowledges a QoS 1 message inside paho's callback, before the
application has stored it (FACTS.md), so the ingester drives paho itself, the
way aiomqtt does: the socket is registered with the event loop
(``add_reader``/``add_writer``) and ``loop_misc`` runs once a second for
keepalive. paho is created with ``manual_ack=True``; ``ack()`` sends the
PUBACK only when the pipeline says the message is committed.

Every connection gets a new *generation*. A message carries the generation it
arrived on; an ack for an older generation is dropped, because packet ids are
reused per connection and the broker redelivers what was not acknowledged
(persistent session, ``clean_start=False``).

Backpressure: ``pause_reading()`` removes the socket from the loop, so TCP
flow control pushes back on the broker, which queues for the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from cityops.backoff import Backoff
from cityops.settings import MqttEndpoint
from ingest import paho_speedups
from ingest.errors import IngestError

# paho creates an MQTT 5 Properties object per PUBLISH and per PUBACK; make
# that cheap (it halved the receive rate; see paho_speedups).
paho_speedups.install()

log = logging.getLogger(__name__)


class MqttUnavailable(IngestError):
    """The broker could not be reached within the configured time."""


@dataclass(frozen=True, slots=True)
class MqttOptions:
    """Session and timing options of the consuming client."""

    client_id: str
    session_expiry_s: int = 7 * 86_400
    """How long the broker keeps the session (and queues for it) while we are away."""
    receive_maximum: int = 10_000
    """MQTT 5 in-flight window: must exceed the unacknowledged messages of a batch."""
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    reads_per_wakeup: int = 64
    """Packets read per socket readiness event; amortises the loop's overhead."""


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A received PUBLISH, with what is needed to acknowledge it later."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    content_type: str | None
    user_properties: tuple[tuple[str, str], ...]
    mid: int
    generation: int
    received_at: float


MessageHandler = Callable[[InboundMessage], None]


@dataclass(slots=True)
class _State:
    generation: int = 0
    sock: socket.socket | None = None
    paused: bool = False
    reading: bool = False
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    connack_error: str | None = None


class ManualAckClient:
    """An MQTT 5 consumer whose acknowledgements the application sends.

    Use as ``async with ManualAckClient(...) as client:``; it connects (retrying
    with jittered backoff), subscribes, and reconnects by itself until closed.
    ``on_message`` runs on the event loop for every PUBLISH and must not block.
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        options: MqttOptions,
        *,
        subscriptions: Sequence[str],
        on_message: MessageHandler,
        on_connection_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._options = options
        self._subscriptions = list(subscriptions)
        self._on_message = on_message
        self._on_connection_change = on_connection_change
        self._loop = asyncio.get_running_loop()
        self._state = _State()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._client = self._make_client()

    # -- paho set-up -------------------------------------------------------

    def _make_client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._options.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        client.on_connect = self._paho_on_connect
        client.on_disconnect = self._paho_on_disconnect
        client.on_message = self._paho_on_message
        client.on_subscribe = self._paho_on_subscribe
        client.on_socket_open = self._paho_on_socket_open
        client.on_socket_close = self._paho_on_socket_close
        client.on_socket_register_write = self._paho_on_register_write
        client.on_socket_unregister_write = self._paho_on_unregister_write
        client.connect_timeout = self._options.connect_timeout_s
        if self._endpoint.username is not None:
            client.username_pw_set(self._endpoint.username, self._endpoint.password)
        tls_context = self._endpoint.ssl_context()  # CITYOPS_MQTT_CA / _CERT / _KEY
        if tls_context is not None:
            client.tls_set_context(tls_context)
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._options.session_expiry_s
        props.ReceiveMaximum = self._options.receive_maximum
        return props

    # -- paho callbacks (all on the event loop's thread, except socket open
    #    during the blocking connect, which runs in an executor) ----------------

    def _paho_on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho does not set TCP_NODELAY; small PUBACKs would wait ~40 ms (FACTS.md).
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop.call_soon_threadsafe(self._attach, sock)

    def _attach(self, sock: socket.socket) -> None:
        self._state.sock = sock
        if not self._state.paused:
            self._start_reading()

    def _paho_on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._stop_reading()
        self._state.sock = None

    def _paho_on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.call_soon_threadsafe(self._watch_writable, sock)

    def _watch_writable(self, sock: socket.socket) -> None:
        # Scheduled from paho (maybe from the connecting thread): the socket
        # may be closed by the time this runs.
        if sock.fileno() != -1:
            self._loop.add_writer(sock, self._on_writable)

    def _paho_on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if sock.fileno() != -1:
            self._loop.remove_writer(sock)

    def _on_writable(self) -> None:
        self._client.loop_write()

    def _paho_on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self._state.connack_error = str(reason)
            log.error("broker %s refused the connection: %s", self._endpoint.url, reason)
            return
        self._state.generation += 1
        log.info(
            "connected to %s (session present: %s, generation %d)",
            self._endpoint.url,
            flags.session_present,
            self._state.generation,
        )
        # Retain handling 1: retained messages only for a new subscription, so a
        # reconnect does not replay every retained status.
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        client.subscribe([(topic, options) for topic in self._subscriptions])
        self._state.disconnected.clear()
        self._state.connected.set()
        if self._on_connection_change is not None:
            self._on_connection_change(True)

    def _paho_on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("subscription to %s refused: %s", self._subscriptions, ", ".join(failed))
            return
        self._state.subscribed.set()

    def _paho_on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        was_connected = self._state.connected.is_set()
        self._state.connected.clear()
        self._state.subscribed.clear()
        self._state.disconnected.set()
        # Acks for messages of the lost connection must not be sent on the next one.
        self._state.generation += 1
        if was_connected:
            level = logging.INFO if self._closing else logging.WARNING
            log.log(level, "disconnected from %s: %s", self._endpoint.url, reason)
            if self._on_connection_change is not None:
                self._on_connection_change(False)

    def _paho_on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        content_type = getattr(props, "ContentType", None) if props is not None else None
        user_props = getattr(props, "UserProperty", None) if props is not None else None
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            # MQTT requires UTF-8 topics; keep the bytes visible for the dead letter.
            topic = msg._topic.decode("utf-8", "backslashreplace")
        self._on_message(
            InboundMessage(
                topic=topic,
                payload=bytes(msg.payload),
                qos=msg.qos,
                retain=msg.retain,
                content_type=content_type,
                user_properties=tuple(user_props) if user_props else (),
                mid=msg.mid,
                generation=self._state.generation,
                received_at=time.time(),
            )
        )

    # -- reading and backpressure --------------------------------------------

    def _start_reading(self) -> None:
        sock = self._state.sock
        if sock is not None and not self._state.reading:
            self._loop.add_reader(sock, self._on_readable)
            self._state.reading = True

    def _stop_reading(self) -> None:
        sock = self._state.sock
        if sock is not None and self._state.reading:
            self._loop.remove_reader(sock)
        self._state.reading = False

    def _on_readable(self) -> None:
        client = self._client
        for _ in range(self._options.reads_per_wakeup):
            rc = client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not self._state.reading:
                break

    def pause_reading(self) -> None:
        """Stop reading the socket (backpressure): the broker queues for us."""
        self._state.paused = True
        self._stop_reading()

    def resume_reading(self) -> None:
        """Read again after ``pause_reading``."""
        self._state.paused = False
        self._start_reading()

    @property
    def paused(self) -> bool:
        """Whether reading is paused by backpressure."""
        return self._state.paused

    @property
    def generation(self) -> int:
        """The current connection's generation."""
        return self._state.generation

    @property
    def is_connected(self) -> bool:
        """Whether a connection is up."""
        return self._state.connected.is_set()

    def ack(self, generation: int, mid: int) -> bool:
        """Acknowledge a QoS 1 message; False if its connection is gone.

        A message of an earlier connection is not acknowledged: the broker
        redelivers it and the idempotent store keeps one copy.
        """
        if generation != self._state.generation or not self._state.connected.is_set():
            return False
        return self._client.ack(mid, 1) == MQTTErrorCode.MQTT_ERR_SUCCESS

    # -- connection supervision ----------------------------------------------

    async def _connect_once(self) -> None:
        self._state.connack_error = None
        await self._loop.run_in_executor(
            None,
            lambda: self._client.connect(
                self._endpoint.host,
                self._endpoint.port,
                keepalive=self._options.keepalive_s,
                clean_start=False,
                properties=self._connect_properties(),
            ),
        )
        try:
            async with asyncio.timeout(self._options.connect_timeout_s):
                while not self._state.connected.is_set():
                    if self._state.connack_error is not None:
                        raise MqttUnavailable(self._state.connack_error)
                    if self._state.sock is None and self._state.disconnected.is_set():
                        msg = "connection closed before CONNACK"
                        raise MqttUnavailable(msg)
                    await asyncio.sleep(0.01)
        except TimeoutError as exc:
            msg = (
                f"no CONNACK from {self._endpoint.url} within "
                f"{self._options.connect_timeout_s:.1f} s"
            )
            raise MqttUnavailable(msg) from exc

    async def _connect_with_retry(self) -> None:
        backoff = Backoff(self._options.backoff_initial_s, self._options.backoff_max_s)
        while not self._closing:
            try:
                await self._connect_once()
            except (OSError, MqttUnavailable) as exc:
                self._client.loop_misc()  # lets paho close a half-open socket
                delay = backoff.next_delay()
                log.warning(
                    "cannot connect to %s (%s); retry %d in %.2f s",
                    self._endpoint.url,
                    exc,
                    backoff.attempts,
                    delay,
                )
                await asyncio.sleep(delay)
            else:
                return

    async def _supervise(self) -> None:
        """Keepalive once a second; reconnect whenever the connection drops."""
        while not self._closing:
            if not self._state.connected.is_set():
                await self._connect_with_retry()
                continue
            self._client.loop_misc()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._state.disconnected.wait()

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until connected and subscribed, or raise ``MqttUnavailable``."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._state.subscribed.wait()
        except TimeoutError as exc:
            msg = f"not connected to {self._endpoint.url} within {timeout_s:.1f} s"
            raise MqttUnavailable(msg) from exc

    async def __aenter__(self) -> ManualAckClient:
        self._supervisor = asyncio.create_task(self._supervise(), name="mqtt-supervisor")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Disconnect cleanly (the session stays on the broker) and stop."""
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._state.connected.is_set():
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._options.session_expiry_s
            self._client.disconnect(properties=props)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    while self._state.sock is not None:
                        self._client.loop_write()
                        if self._state.sock is not None:
                            self._client.loop_read()
                        await asyncio.sleep(0.005)
        self._stop_reading()
        if self._state.sock is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._state.sock)
