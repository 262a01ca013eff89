"""The readings and presence topic scheme, parsed once per distinct topic.

``city/{domain}/{district}/{device_id}`` carries readings and
``city/{domain}/{district}/{device_id}/status`` carries retained presence.
The same few thousand topics repeat for ever, so successful parses are kept
in a bounded LRU cache; rejected topics are not cached (an exception is never
memoised), so junk traffic cannot evict the good entries.
"""

from __future__ import annotations

import functools
import re

from ingest.errors import DecodeError
from ingest.model import DOMAINS, DeviceRef

__all__ = ["TOPIC_CACHE_SIZE", "parse_topic"]

TOPIC_CACHE_SIZE = 200_000
"""Distinct topics remembered; one entry is about 0.5 KB, so at most ~100 MB."""

_SEGMENT = re.compile(r"[a-z0-9-]{1,64}")
_STATUS = "status"
# "city/" + longest domain + two 64-char segments + "/status", with the slashes.
_MAX_TOPIC_LEN = 5 + max(map(len, DOMAINS)) + 1 + 64 + 1 + 64 + 1 + len(_STATUS)
_SHOWN_CHARS = 120


def _shown(topic: str) -> str:
    """The topic as quoted in an error reason, cut short if it is huge."""
    if len(topic) <= _SHOWN_CHARS:
        return repr(topic)
    return repr(topic[:_SHOWN_CHARS]) + f"… ({len(topic)} chars)"


def _check_segment(topic: str, what: str, segment: str) -> None:
    if _SEGMENT.fullmatch(segment) is None:
        reason = (
            "is empty"
            if not segment
            else f"{segment[:_SHOWN_CHARS]!r} is longer than 64 characters"
            if len(segment) > 64
            else f"{segment!r} has characters outside [a-z0-9-]"
        )
        msg = f"topic {_shown(topic)}: {what} {reason}"
        raise DecodeError(msg)


@functools.lru_cache(maxsize=TOPIC_CACHE_SIZE)
def parse_topic(topic: str) -> tuple[DeviceRef, bool]:
    """Parse a device topic of the fixed scheme.

    Args:
        topic: The MQTT topic the message arrived on.

    Returns:
        The device named by the topic, and whether this is its ``/status``
        (presence) topic rather than its readings topic.

    Raises:
        DecodeError: The topic is outside the scheme; the reason names the
            topic and the offending part.
    """
    if len(topic) > _MAX_TOPIC_LEN:
        msg = f"topic {_shown(topic)}: longer than the {_MAX_TOPIC_LEN} characters of the scheme"
        raise DecodeError(msg)
    parts = topic.split("/")
    n_parts = len(parts)
    if n_parts not in (4, 5) or parts[0] != "city":
        msg = (
            f"topic {_shown(topic)}: not of the form city/{{domain}}/{{district}}/{{device_id}}"
            "[/status]"
        )
        raise DecodeError(msg)
    is_status = n_parts == 5
    if is_status and parts[4] != _STATUS:
        msg = f"topic {_shown(topic)}: unknown sub-topic {parts[4]!r} (only 'status' exists)"
        raise DecodeError(msg)
    domain = parts[1]
    if domain not in DOMAINS:
        expected = ", ".join(DOMAINS)
        msg = f"topic {_shown(topic)}: unknown domain {domain!r} (expected one of {expected})"
        raise DecodeError(msg)
    _check_segment(topic, "district", parts[2])
    _check_segment(topic, "device_id", parts[3])
    return DeviceRef(domain, parts[2], parts[3]), is_status
