"""Backup and restore as docs/data-lifecycle.md describes: pg_dump -Fc of a live database,
restored into a fresh one between timescaledb_pre_restore() and timescaledb_post_restore()."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cityops.db import migrate
from tests.conftest import ADMIN_DATABASE, PostgresServer

PG_BIN = Path("/usr/lib/postgresql/15/bin")
CHECKSUMS = {
    "readings": "SELECT count(*), md5(coalesce(string_agg(concat_ws('|', ts, series_id, value,"
    " state, received_at), ',' ORDER BY series_id, ts), '')) FROM readings",
    "readings_1m": "SELECT count(*), md5(coalesce(string_agg(concat_ws('|', series_id, bucket,"
    " readings, min, max, sum), ',' ORDER BY series_id, bucket), '')) FROM readings_1m",
    "alerts": "SELECT count(*), md5(coalesce(string_agg(concat_ws('|', id, rule_id, subject,"
    " state, version, raised_at), ',' ORDER BY id), '')) FROM alerts",
    "alert_events": "SELECT count(*), md5(coalesce(string_agg(concat_ws('|', alert_id, version,"
    " action, actor, at), ',' ORDER BY alert_id, version), '')) FROM alert_events",
    "audit_log": "SELECT count(*), md5(coalesce(string_agg(concat_ws('|', id, at, actor,"
    " action), ',' ORDER BY id), '')) FROM audit_log",
}


def checksums(url: str) -> dict[str, tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return {name: tuple(conn.execute(q).fetchone() or ()) for name, q in CHECKSUMS.items()}


@pytest.fixture
def restored_url(postgres: PostgresServer) -> Iterator[str]:
    name = f"restore_{uuid.uuid4().hex}"
    with psycopg.connect(postgres.url(ADMIN_DATABASE), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield postgres.url(name)
    with psycopg.connect(postgres.url(ADMIN_DATABASE), autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def seed(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO devices (id, domain, district) VALUES ('d-1', 'traffic', 'chuo')")
        conn.execute(
            "INSERT INTO series (device_id, channel) VALUES ('d-1', 'intensity'), ('d-1', 'mode')"
        )
        conn.execute(
            "INSERT INTO readings (ts, series_id, value, received_at)"
            " SELECT now() - make_interval(secs => g * 37), 1, g * 0.5, now()"
            " FROM generate_series(1, 20000) g"
        )
        conn.execute(
            "INSERT INTO readings (ts, series_id, state, received_at)"
            " VALUES (now() - interval '1 hour', 2, 'alarm', now())"
        )
        conn.execute(
            "INSERT INTO alerts (id, rule_id, subject, severity, state, version, message,"
            " raised_at, updated_at, active, acked, occurrences, unacked_since, source)"
            " VALUES ('a-1', 'r', 'd-1', 'major', 'active_unacked', 1, 'm', now(), now(),"
            " true, false, 1, now(), 'live')"
        )
        conn.execute(
            "INSERT INTO alert_events (alert_id, version, action, from_state, to_state, actor, at)"
            " VALUES ('a-1', 1, 'raise', 'normal', 'active_unacked', 'rules', now())"
        )
        conn.execute(
            "INSERT INTO audit_log (actor, action, remote_addr)"
            " VALUES ('hanako', 'login', '192.0.2.1')"
        )
    subprocess.run(  # the roll-ups, so the dump holds them too
        [sys.executable, "-m", "cityops.cli", "db", "rollup"],
        env={**os.environ, "CITYOPS_DATABASE_URL": url},
        check=True,
        capture_output=True,
    )


@pytest.mark.slow
def test_a_dump_of_a_live_database_restores_the_same_readings_and_alerts(
    database_url: str, restored_url: str, tmp_path: Path
) -> None:
    seed(database_url)
    dump = tmp_path / "cityops.dump"
    subprocess.run(
        [PG_BIN / "pg_dump", "-Fc", "-f", dump, "-d", database_url],
        check=True,
        capture_output=True,
    )
    with psycopg.connect(restored_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        conn.execute("SELECT timescaledb_pre_restore()")
    subprocess.run(
        [PG_BIN / "pg_restore", "--no-owner", "-d", restored_url, dump],
        check=True,
        capture_output=True,
    )
    with psycopg.connect(restored_url, autocommit=True) as conn:
        conn.execute("SELECT timescaledb_post_restore()")
    original = checksums(database_url)
    assert original["readings"][0] == 20001
    assert original["readings_1m"][0] > 0
    assert checksums(restored_url) == original
    # The restored database is a working cityops database: schema current,
    # hypertables accept readings, roll-ups continue.
    assert migrate(restored_url) == []
    with psycopg.connect(restored_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO readings (ts, series_id, value, received_at) VALUES (now(), 1, 1, now())"
        )
        chunks = conn.execute("SELECT count(*) FROM show_chunks('readings')").fetchone()
        assert chunks is not None
        assert chunks[0] > 0
