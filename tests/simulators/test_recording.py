from __future__ import annotations

from pathlib import Path

import pytest

from simulators import RecordedMessage, RecordingError, RecordingReader, RecordingWriter
from simulators.recording import FILE_HEADER


def _messages(n: int, start: int = 0) -> list[RecordedMessage]:
    return [
        RecordedMessage(
            1_780_000_000.0 + i,
            f"city/traffic/kita/loop-{i % 7}",
            b'{"ts":%d,"intensity":%d}' % (i, i),
            i % 2,
            i % 5 == 0,
            "application/json" if i % 3 else None,
        )
        for i in range(start, start + n)
    ]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _write(path: Path, blocks: list[list[RecordedMessage]]) -> None:
    with RecordingWriter(path, fsync=False) as writer:
        for block in blocks:
            for m in block:
                writer.append(m)
            writer.flush()


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r.rec"
    blocks = [_messages(100), _messages(50, 100), _messages(1, 150)]
    _write(path, blocks)
    reader = RecordingReader(path)
    assert list(reader) == [m for b in blocks for m in b]
    assert reader.stats.blocks == 3
    assert not reader.stats.truncated_tail
    assert reader.block_counts() == (151, blocks[0][0].t, blocks[2][0].t)


def test_compact(tmp_path: Path) -> None:
    path = tmp_path / "r.rec"
    messages = _messages(5000)
    _write(path, [messages])
    raw = sum(len(m.payload) + len(m.topic) for m in messages)
    assert path.stat().st_size < raw / 3


def test_flushes_a_block_at_least_every_interval(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "r.rec"
    writer = RecordingWriter(path, fsync=False, clock=clock, flush_interval_s=1.0)
    writer.append(_messages(1)[0])
    writer.maybe_flush()
    assert writer.blocks == 0
    clock.now = 1.0
    writer.maybe_flush()
    assert writer.blocks == 1
    # A crash now (no close) loses nothing that was flushed.
    assert len(list(RecordingReader(path))) == 1
    writer.close()


@pytest.mark.parametrize("cut", [1, 5, 16, 17, 40])
def test_truncated_tail_loses_only_the_last_block(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "r.rec"
    _write(path, [_messages(20), _messages(20, 20), _messages(20, 40)])
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size - cut)
    reader = RecordingReader(path)
    got = list(reader)
    assert got == _messages(40)
    assert reader.stats.truncated_tail


def test_corrupt_middle_block_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "r.rec"
    _write(path, [_messages(20), _messages(20, 20), _messages(20, 40)])
    data = bytearray(path.read_bytes())
    first_block_end = (
        len(FILE_HEADER)
        + 16
        + int.from_bytes(data[len(FILE_HEADER) + 4 : len(FILE_HEADER) + 8], "little")
    )
    data[first_block_end + 30] ^= 0xFF  # a bit flip inside the second block's body
    path.write_bytes(bytes(data))
    reader = RecordingReader(path)
    assert list(reader) == _messages(20) + _messages(20, 40)
    assert reader.stats.corrupt_blocks == 1


def test_reopening_cuts_a_torn_tail_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "r.rec"
    _write(path, [_messages(10)])
    with path.open("ab") as handle:
        handle.write(b"\xb1\x0cRC\x99\x99")  # a block head torn by a crash
    _write(path, [_messages(10, 10)])
    reader = RecordingReader(path)
    assert list(reader) == _messages(20)
    assert not reader.stats.truncated_tail


def test_not_a_recording(tmp_path: Path) -> None:
    path = tmp_path / "x.rec"
    path.write_bytes(b"hello world, not a recording")
    with pytest.raises(RecordingError, match="not a cityops recording"):
        list(RecordingReader(path))
    with pytest.raises(RecordingError, match="cannot open recording"):
        list(RecordingReader(tmp_path / "missing.rec"))
