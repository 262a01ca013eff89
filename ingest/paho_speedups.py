"""Make paho-mqtt's MQTT 5 ``Properties`` cheap to create, without changing behaviour.

paho builds three lookup tables (27 property names, 7 types, 27 rules) in
every ``Properties.__init__`` and scans all names with ``str.replace`` and
``hasattr`` in ``clear()``. Every received PUBLISH and every PUBACK sent
creates one, so with MQTT 5 this alone caps a paho consumer at roughly half
its MQTT 3.1.1 rate (measured here: see docs/ingest.md, and paho's own
performance discussion, eclipse-paho/paho.mqtt.python#932).

``install()`` builds the tables once and makes ``__init__`` share them, and
makes ``clear``/``isEmpty`` look only at the instance's own attributes. The
tables are the ones paho builds (taken from a real instance), never written
to by paho, so every other method behaves as before;
``tests/ingest/test_paho_speedups.py`` checks that encoding and decoding are
unchanged. Installed once, process-wide, by the ingester's MQTT client.
"""

from __future__ import annotations

from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_installed = False


def install() -> None:
    """Patch ``paho.mqtt.properties.Properties`` (idempotent)."""
    global _installed  # noqa: PLW0603 (process-wide, once)
    if _installed:
        return
    template: Any = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    types = template.types
    names = template.names
    rules = template.properties
    compressed = tuple(name.replace(" ", "") for name in names)
    set_attr = object.__setattr__

    def fast_init(self: Any, packetType: int) -> None:
        set_attr(self, "packetType", packetType)
        set_attr(self, "types", types)
        set_attr(self, "names", names)
        set_attr(self, "properties", rules)

    def fast_clear(self: Any) -> None:
        attrs = self.__dict__
        for name in compressed:
            attrs.pop(name, None)

    def fast_is_empty(self: Any) -> bool:
        attrs = self.__dict__
        return not any(name in attrs for name in compressed)

    Properties.__init__ = fast_init  # type: ignore[method-assign]
    Properties.clear = fast_clear  # type: ignore[method-assign]
    Properties.isEmpty = fast_is_empty  # type: ignore[method-assign]
    _installed = True
