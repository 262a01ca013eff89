"""The broker and database a benchmark runs against: given URLs, or its own."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cityops.db import migrate
from cityops.embedded import EmbeddedMosquitto, EmbeddedPostgres


@contextlib.contextmanager
def bench_services(
    mqtt_url: str | None, database_url: str | None
) -> Iterator[tuple[str, str, Path]]:
    """Yield (broker URL, migrated database URL, scratch dir).

    Services not given by URL are started in a temporary directory with the
    same tuning as ``cityops up``, and stopped on exit, SIGTERM included.
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with (
        tempfile.TemporaryDirectory(prefix="cityops-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        os.chmod(tmp, 0o755)
        root = Path(tmp)
        if mqtt_url is None:
            broker = stack.enter_context(EmbeddedMosquitto(root / "mosquitto"))
            mqtt_url = broker.url
        if database_url is None:
            pg = stack.enter_context(EmbeddedPostgres(root / "postgres"))
            pg.ensure_database("bench")
            database_url = pg.url("bench")
        migrate(database_url)
        yield mqtt_url, database_url, root
