#!/usr/bin/env python3
"""Container health probes of the cityops image (``cityops-healthcheck``).

``cityops-healthcheck api``
    GET ``/readyz`` of the API on ``CITYOPS_HTTP``: healthy when it answers
    200 (database reachable, migrations current, broker connected).
``cityops-healthcheck ingest [--port 9464]``
    GET ``/metrics`` of an ingester: healthy while
    ``cityops_ingest_mqtt_connected`` is 1. An ingester whose database is down
    stays healthy on purpose: it holds its batches and stops acknowledging
    (backpressure), and a restart would not help; ``paused`` and
    ``storage_errors_total`` tell that story (docs/operations.md).

Exit status 0 when healthy, 1 otherwise, with one line on stdout saying why
(Docker keeps it in ``docker inspect``). Standard library only: the probe
runs often and must start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0
_WILDCARDS = {"0.0.0.0", "::", ""}  # a listener on every address answers on loopback


def api_url(http: str) -> str:
    """The ``/readyz`` URL for a ``CITYOPS_HTTP`` value (``host:port``)."""
    host, _, port = http.rpartition(":")
    host = host.strip("[]")
    if host in _WILDCARDS:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/readyz"


def ingest_connected(metrics_text: str) -> bool:
    """Whether a ``/metrics`` page says the ingester is connected to the broker."""
    for line in metrics_text.splitlines():
        name, _, value = line.partition(" ")
        if name == "cityops_ingest_mqtt_connected":
            return float(value) == 1.0
    return False


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return int(response.status), response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def main(argv: list[str] | None = None) -> int:
    """Run one probe; 0 when healthy."""
    parser = argparse.ArgumentParser(prog="cityops-healthcheck", description=__doc__)
    sub = parser.add_subparsers(dest="service", required=True)
    sub.add_parser("api", help="GET /readyz on CITYOPS_HTTP")
    ingest = sub.add_parser("ingest", help="GET /metrics: connected to the broker?")
    ingest.add_argument("--port", type=int, default=9464)
    args = parser.parse_args(argv)
    try:
        if args.service == "api":
            url = api_url(os.environ.get("CITYOPS_HTTP", "127.0.0.1:8080"))
            status, body = _get(url)
            print(f"{url}: {status} {body.strip()[:200]}")
            return 0 if status == 200 else 1
        url = f"http://127.0.0.1:{args.port}/metrics"
        status, body = _get(url)
        connected = status == 200 and ingest_connected(body)
        print(f"{url}: {status}, broker {'connected' if connected else 'NOT connected'}")
    except (OSError, ValueError) as exc:
        print(f"probe failed: {exc}")
        return 1
    return 0 if connected else 1


if __name__ == "__main__":
    sys.exit(main())
