"""The recordings folder the API may replay: safe lookup by name, header-only summaries.

A recording (:mod:`simulators.recording`) is a file header followed by
zstd-compressed blocks, each with a head that gives its size and message
count. :func:`read_recording_info` summarises a file from those heads alone
and decodes only its first and last block (for the first and last message
time), so listing a folder of large recordings stays cheap.
:class:`RecordingFolder` looks recordings up by plain file name (never a path
out of the folder) and caches each summary until its file changes.
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import zstandard

from control_api.errors import InvalidJobRequest, RecordingNotFound
from simulators import (
    BLOCK_MAGIC,
    FILE_HEADER,
    RecordedMessage,
    RecordingError,
    decode_block,
)

__all__ = ["RecordingFolder", "RecordingInfo", "read_recording_info"]

log = logging.getLogger(__name__)

_RECORDING_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_BLOCK_HEAD: Final = struct.Struct("<4sIII")
"""A recording block's head: magic, compressed size, CRC, message count (simulators.recording)."""


@dataclass(frozen=True, slots=True)
class RecordingInfo:
    """What the block heads of a recording say, plus its first and last message time.

    Attributes:
        name: File name inside the recordings folder.
        size_bytes: File size.
        modified_at: Last modification, epoch seconds.
        messages: Messages in the readable blocks (from the block heads).
        first_t: Receive time of the first message, if any.
        last_t: Receive time of the last message, if any.
        complete: Every byte belongs to a well-framed block (no torn tail, no
            damage); an incomplete recording still replays its good blocks.
    """

    name: str
    size_bytes: int
    modified_at: float
    messages: int
    first_t: float | None
    last_t: float | None
    complete: bool

    @property
    def duration_s(self) -> float | None:
        """Seconds from the first to the last message."""
        if self.first_t is None or self.last_t is None:
            return None
        return self.last_t - self.first_t


def _block_times(handle: BinaryIO, offset: int) -> list[RecordedMessage]:
    handle.seek(offset)
    head = handle.read(_BLOCK_HEAD.size)
    size = _BLOCK_HEAD.unpack(head)[1]
    return decode_block(head, handle.read(size), zstandard.ZstdDecompressor())


def read_recording_info(path: Path) -> RecordingInfo:
    """Summarise a recording from its block heads; only the first and last block are decoded.

    Blocking (file I/O): call it from a thread.

    Raises:
        RecordingError: the file cannot be read or is not a cityops recording.
    """
    try:
        stat = path.stat()
        with path.open("rb") as handle:
            header = handle.read(len(FILE_HEADER))
            if header[:8] != FILE_HEADER[:8]:
                msg = f"{path.name!r} is not a cityops recording (bad header)"
                raise RecordingError(msg)
            pos, messages, complete = len(FILE_HEADER), 0, True
            first_block: int | None = None
            last_block: int | None = None
            while pos < stat.st_size:
                handle.seek(pos)
                head = handle.read(_BLOCK_HEAD.size)
                if len(head) < _BLOCK_HEAD.size:
                    complete = False
                    break
                magic, size, _crc, count = _BLOCK_HEAD.unpack(head)
                if magic != BLOCK_MAGIC or pos + _BLOCK_HEAD.size + size > stat.st_size:
                    complete = False  # damaged or torn: the reader scans past it, we stop here
                    break
                if count:
                    first_block = pos if first_block is None else first_block
                    last_block = pos
                messages += count
                pos += _BLOCK_HEAD.size + size
            first_t = last_t = None
            try:
                if first_block is not None and last_block is not None:
                    first_t = _block_times(handle, first_block)[0].t
                    last_t = _block_times(handle, last_block)[-1].t
            except (RecordingError, IndexError):
                complete = False
    except OSError as exc:
        msg = f"cannot read recording {path.name!r}: {exc.strerror}"
        raise RecordingError(msg) from exc
    return RecordingInfo(
        name=path.name,
        size_bytes=stat.st_size,
        modified_at=stat.st_mtime,
        messages=messages,
        first_t=first_t,
        last_t=last_t,
        complete=complete,
    )


class RecordingFolder:
    """The recordings that may be replayed: one folder, looked up by plain file name.

    Args:
        folder: The recordings folder; ``None``: there are no recordings.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._info_cache: dict[tuple[str, int, int], RecordingInfo] = {}

    def path(self, name: str) -> Path:
        """The file of recording ``name``.

        Raises:
            InvalidJobRequest: ``name`` is not a plain file name (no folders, no ``..``).
            RecordingNotFound: there is no such recording.
        """
        if _RECORDING_NAME.fullmatch(name) is None:
            msg = (
                f"recording name {name!r} must be a plain file name: letters, digits, '.', '_' "
                "and '-', starting with a letter or digit, at most 128 characters"
            )
            raise InvalidJobRequest(msg)
        folder = self.folder
        if folder is None:
            msg = f"no recording {name!r}: this API has no recordings folder configured"
            raise RecordingNotFound(msg)
        path = folder / name
        try:
            inside = path.resolve().parent == folder.resolve()
        except OSError:
            inside = False
        if not inside or not path.is_file():
            msg = f"no recording {name!r} in {str(folder)!r}"
            raise RecordingNotFound(msg)
        return path

    def info(self, path: Path) -> RecordingInfo:
        """:func:`read_recording_info`, cached until the file changes (blocking)."""
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        info = self._info_cache.get(key)
        if info is None:
            info = read_recording_info(path)
            if len(self._info_cache) > 1000:
                self._info_cache.clear()
            self._info_cache[key] = info
        return info

    def scan(self) -> list[RecordingInfo]:
        """The recordings in the folder, by name; files that are not recordings are left out.

        Blocking (file I/O): call it from a thread.
        """
        folder = self.folder
        if folder is None or not folder.is_dir():
            return []
        out: list[RecordingInfo] = []
        for path in sorted(folder.iterdir()):
            if not (_RECORDING_NAME.fullmatch(path.name) and path.is_file()):
                continue
            try:
                out.append(self.info(path))
            except (RecordingError, OSError) as exc:
                log.debug("not listing %s: %s", path, exc)
        return out
