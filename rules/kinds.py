"""Device kinds: readings name a device, not its kind, so the kind is resolved.

The default resolver reads the kind from the device id prefix used by the
simulated city (``loop-aoba-001`` → ``loop-detector``). Deployments with a
device registry inject their own resolver (e.g. a lookup in ``devices``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from ingest import DeviceRef

__all__ = ["DEFAULT_KIND_PREFIXES", "KindResolver", "prefix_kind_resolver"]

KindResolver = Callable[[DeviceRef], str | None]

DEFAULT_KIND_PREFIXES: Final[Mapping[str, str]] = {
    "loop": "loop-detector",
    "sig": "signal-controller",
    "park": "parking",
    "pwr": "power-meter",
    "clim": "indoor-climate",
    "tank": "water-tank",
    "pump": "pump",
    "elev": "elevator",
    "light": "streetlight",
    "aq": "air-quality",
    "fire": "fire-panel",
    "smoke": "smoke-detector",
    "gas": "gas-detector",
    "river": "river-gauge",
    "upass": "underpass-gauge",
    "call": "call-button",
    "seis": "seismometer",
}
"""Device id prefix (before the first ``-``) → kind, as in ``simulators/cities/*.yaml``."""


def prefix_kind_resolver(prefixes: Mapping[str, str] = DEFAULT_KIND_PREFIXES) -> KindResolver:
    """A resolver that maps the device id's first ``-``-separated part to a kind."""
    table = dict(prefixes)

    def resolve(device: DeviceRef) -> str | None:
        return table.get(device.device_id.split("-", 1)[0])

    return resolve
