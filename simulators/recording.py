r"""Recording files: compact, append-only, compressed, and safe against a crash.

Layout (little-endian)::

    file   := header block*
    header := b"CYOPSREC" u8 version(=1) 7 x u8 reserved(0)           16 bytes
    block  := magic(b"\\xb1\\x0cRC") u32 size u32 crc u32 count            16 bytes
              zstd(record*)                                        size bytes
    record := f64 recv_time u8 flags u8 ct_len u16 topic_len u32 payload_len
              content_type topic payload
    flags  := bits 0-1 QoS, bit 2 retain

``crc`` is the CRC-32 of ``count`` (4 bytes) followed by the compressed
bytes. Each block is compressed on its own and written whole, so a recorder
that dies loses at most the block it was filling (the writer flushes at
least every second) plus a torn block at the tail, which readers detect by
length or CRC and skip; reopening a file for appending cuts such a tail off.
A corrupt block in the middle is skipped by scanning for the next magic.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final

import zstandard

from simulators.errors import RecordingError

__all__ = [
    "BLOCK_MAGIC",
    "FILE_HEADER",
    "RecordedMessage",
    "RecordingReader",
    "RecordingWriter",
    "decode_block",
    "decode_records",
    "encode_block",
    "encode_records",
]

log = logging.getLogger(__name__)

FILE_HEADER: Final = b"CYOPSREC" + bytes([1]) + bytes(7)
BLOCK_MAGIC: Final = b"\xb1\x0cRC"
_BLOCK_HEAD = struct.Struct("<4sIII")
_RECORD_HEAD = struct.Struct("<dBBHI")
_MAX_BLOCK_SIZE: Final = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    """One captured MQTT message.

    Attributes:
        t: Receive time, epoch seconds.
        topic: Topic.
        payload: Payload bytes, exactly as received.
        qos: QoS it was delivered with.
        retain: Whether it was a retained message.
        content_type: MQTT 5 content type, if any.
    """

    t: float
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    content_type: str | None = None


def encode_records(messages: Sequence[RecordedMessage]) -> bytes:
    """The uncompressed bytes of a block's records."""
    parts: list[bytes] = []
    pack = _RECORD_HEAD.pack
    for m in messages:
        topic = m.topic.encode()
        ct = (m.content_type or "").encode()[:255]
        parts.append(
            pack(m.t, (m.qos & 3) | (4 if m.retain else 0), len(ct), len(topic), len(m.payload))
        )
        parts.append(ct)
        parts.append(topic)
        parts.append(m.payload)
    return b"".join(parts)


def decode_records(data: bytes) -> list[RecordedMessage]:
    """Records from uncompressed block bytes.

    Raises:
        RecordingError: the bytes end inside a record.
    """
    out: list[RecordedMessage] = []
    view = memoryview(data)
    pos = 0
    size = _RECORD_HEAD.size
    unpack = _RECORD_HEAD.unpack_from
    while pos < len(data):
        if pos + size > len(data):
            msg = f"record header cut short at byte {pos} of a block"
            raise RecordingError(msg)
        t, flags, ct_len, topic_len, payload_len = unpack(data, pos)
        pos += size
        end = pos + ct_len + topic_len + payload_len
        if end > len(data):
            msg = f"record body cut short at byte {pos} of a block"
            raise RecordingError(msg)
        ct = bytes(view[pos : pos + ct_len]).decode() if ct_len else None
        pos += ct_len
        topic = bytes(view[pos : pos + topic_len]).decode()
        pos += topic_len
        out.append(RecordedMessage(t, topic, bytes(view[pos:end]), flags & 3, bool(flags & 4), ct))
        pos = end
    return out


def encode_block(
    messages: Sequence[RecordedMessage], compressor: zstandard.ZstdCompressor
) -> bytes:
    """A framed, compressed block holding ``messages``."""
    body = compressor.compress(encode_records(messages))
    count = struct.pack("<I", len(messages))
    crc = zlib.crc32(body, zlib.crc32(count))
    return _BLOCK_HEAD.pack(BLOCK_MAGIC, len(body), crc, len(messages)) + body


def decode_block(
    head: bytes, body: bytes, decompressor: zstandard.ZstdDecompressor
) -> list[RecordedMessage]:
    """The messages of one block given its 16-byte head and its body.

    Raises:
        RecordingError: bad magic, CRC mismatch, or undecodable content.
    """
    magic, size, crc, count = _BLOCK_HEAD.unpack(head)
    if magic != BLOCK_MAGIC or size != len(body):
        msg = "not a block (bad magic or size)"
        raise RecordingError(msg)
    if zlib.crc32(body, zlib.crc32(struct.pack("<I", count))) != crc:
        msg = "block CRC mismatch"
        raise RecordingError(msg)
    try:
        raw = decompressor.decompress(body)
    except zstandard.ZstdError as exc:
        msg = f"block does not decompress: {exc}"
        raise RecordingError(msg) from exc
    messages = decode_records(raw)
    if len(messages) != count:
        msg = f"block says {count} records but holds {len(messages)}"
        raise RecordingError(msg)
    return messages


@dataclass(slots=True)
class ReadStats:
    """What a reader met besides good blocks."""

    blocks: int = 0
    messages: int = 0
    skipped_bytes: int = 0
    corrupt_blocks: int = 0
    truncated_tail: bool = False
    valid_end: int = len(FILE_HEADER)
    """Offset just after the last good block."""


@dataclass(slots=True)
class RecordingReader:
    """Reads a recording, tolerating a torn tail and corrupt blocks.

    Args:
        path: The recording file.
    """

    path: Path
    stats: ReadStats = field(default_factory=ReadStats)

    def _open(self) -> BinaryIO:
        try:
            handle = self.path.open("rb")
        except OSError as exc:
            msg = f"cannot open recording {str(self.path)!r}: {exc.strerror}"
            raise RecordingError(msg) from exc
        header = handle.read(len(FILE_HEADER))
        if header[:8] != FILE_HEADER[:8]:
            handle.close()
            msg = f"{str(self.path)!r} is not a cityops recording (bad header)"
            raise RecordingError(msg)
        if header[8] != FILE_HEADER[8]:
            handle.close()
            msg = f"{str(self.path)!r}: recording version {header[8]} is not supported (expected 1)"
            raise RecordingError(msg)
        return handle

    def blocks(self) -> Iterator[list[RecordedMessage]]:
        """Each good block's messages, in file order.

        Raises:
            RecordingError: the file cannot be opened or is not a recording.
        """
        self.stats = stats = ReadStats()
        decompressor = zstandard.ZstdDecompressor()
        with self._open() as handle:
            data_end = handle.seek(0, os.SEEK_END)
            pos = handle.seek(len(FILE_HEADER))
            while pos < data_end:
                handle.seek(pos)
                head = handle.read(_BLOCK_HEAD.size)
                if len(head) < _BLOCK_HEAD.size:
                    stats.truncated_tail = True
                    stats.skipped_bytes += len(head)
                    break
                magic, size, _crc, _count = _BLOCK_HEAD.unpack(head)
                if magic == BLOCK_MAGIC and size <= _MAX_BLOCK_SIZE:
                    body = handle.read(size)
                    if len(body) < size:
                        stats.truncated_tail = True
                        stats.skipped_bytes += _BLOCK_HEAD.size + len(body)
                        break
                    try:
                        messages = decode_block(head, body, decompressor)
                    except RecordingError as exc:
                        log.warning("%s: skipping block at byte %d: %s", self.path, pos, exc)
                        stats.corrupt_blocks += 1
                    else:
                        pos += _BLOCK_HEAD.size + size
                        stats.blocks += 1
                        stats.messages += len(messages)
                        stats.valid_end = pos
                        yield messages
                        continue
                nxt = self._find_magic(handle, pos + 1, data_end)
                stats.skipped_bytes += (nxt if nxt is not None else data_end) - pos
                if nxt is None:
                    stats.truncated_tail = True
                    break
                pos = nxt

    @staticmethod
    def _find_magic(handle: BinaryIO, start: int, end: int) -> int | None:
        chunk = 1 << 20
        pos = start
        while pos < end:
            handle.seek(pos)
            data = handle.read(chunk + len(BLOCK_MAGIC) - 1)
            found = data.find(BLOCK_MAGIC)
            if found >= 0:
                return pos + found
            pos += chunk
        return None

    def __iter__(self) -> Iterator[RecordedMessage]:
        """Every readable message, in file order."""
        for block in self.blocks():
            yield from block

    def block_counts(self) -> tuple[int, float | None, float | None]:
        """Total messages, first and last receive time (reads every block)."""
        total = 0
        first = last = None
        for block in self.blocks():
            total += len(block)
            if block:
                first = block[0].t if first is None else first
                last = block[-1].t
        return total, first, last


class RecordingWriter:
    """Appends messages to a recording in compressed, framed blocks.

    Thread-safe: a network thread may :meth:`append` while another calls
    :meth:`maybe_flush` on a timer. A block is written when it reaches
    ``max_block_bytes`` or when its oldest message is ``flush_interval_s`` old.

    Args:
        path: The file; created, or reopened for appending (a torn tail is cut off).
        flush_interval_s: Longest time a message waits in memory.
        max_block_bytes: Uncompressed size that closes a block early.
        level: zstd compression level.
        fsync: ``fsync`` after every block (survives power loss, not only a crash).
        clock: Monotonic clock, injectable for tests.
    """

    def __init__(
        self,
        path: Path,
        *,
        flush_interval_s: float = 1.0,
        max_block_bytes: int = 1 << 20,
        level: int = 3,
        fsync: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._flush_interval_s = flush_interval_s
        self._max_block_bytes = max_block_bytes
        self._fsync = fsync
        self._clock = clock
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._lock = threading.Lock()
        self._pending: list[RecordedMessage] = []
        self._pending_bytes = 0
        self._oldest = 0.0
        self.written = 0
        self.blocks = 0
        self._handle = self._open()

    def _open(self) -> BinaryIO:
        handle: BinaryIO
        try:
            if self.path.exists() and self.path.stat().st_size > 0:
                reader = RecordingReader(self.path)
                for _ in reader.blocks():
                    pass
                handle = self.path.open("r+b")
                if reader.stats.valid_end < handle.seek(0, os.SEEK_END):
                    log.warning(
                        "%s: cutting %d bytes of torn tail before appending",
                        self.path,
                        handle.tell() - reader.stats.valid_end,
                    )
                handle.truncate(reader.stats.valid_end)
                handle.seek(reader.stats.valid_end)
                return handle
            handle = self.path.open("wb")
            handle.write(FILE_HEADER)
            handle.flush()
            return handle
        except OSError as exc:
            msg = f"cannot open {str(self.path)!r} for recording: {exc.strerror}"
            raise RecordingError(msg) from exc

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def append(self, message: RecordedMessage) -> None:
        """Buffer one message; writes a block if the buffer is full."""
        with self._lock:
            if not self._pending:
                self._oldest = self._clock()
            self._pending.append(message)
            self._pending_bytes += len(message.payload) + len(message.topic) + 16
            if self._pending_bytes >= self._max_block_bytes:
                self._write_block()

    def maybe_flush(self) -> None:
        """Write the buffered messages if the oldest has waited ``flush_interval_s``."""
        with self._lock:
            if self._pending and self._clock() - self._oldest >= self._flush_interval_s:
                self._write_block()

    def flush(self) -> None:
        """Write the buffered messages now."""
        with self._lock:
            if self._pending:
                self._write_block()

    def _write_block(self) -> None:
        block = encode_block(self._pending, self._compressor)
        try:
            self._handle.write(block)
            self._handle.flush()
            if self._fsync:
                os.fsync(self._handle.fileno())
        except OSError as exc:
            msg = f"cannot write to {str(self.path)!r}: {exc.strerror}"
            raise RecordingError(msg) from exc
        self.written += len(self._pending)
        self.blocks += 1
        self._pending = []
        self._pending_bytes = 0

    def close(self) -> None:
        """Write what is buffered and close the file (idempotent)."""
        if self._handle.closed:
            return
        try:
            self.flush()
        finally:
            self._handle.close()
