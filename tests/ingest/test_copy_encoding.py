"""The hand-packed binary COPY stream equals what psycopg would write."""

from __future__ import annotations

import psycopg

from ingest.store import encode_copy_rows


def test_encoded_rows_round_trip_through_postgres(database_url: str) -> None:
    rows = [
        (7, 1_700_000_000.123456, 21.5, None, 1_700_000_001.5),
        (8, 1_700_000_000.0, None, "alarm", 1_700_000_002.25),
        (9, 946_684_800.0, -0.0, None, 946_684_800.000001),
    ]
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "CREATE TEMP TABLE t (series_id int4, ts timestamptz, value float8,"
            " state text, received_at timestamptz)"
        )
        with conn.cursor() as cur, cur.copy("COPY t FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(encode_copy_rows(rows))
        got = conn.execute(
            "SELECT series_id, extract(epoch FROM ts)::float8, value, state,"
            " extract(epoch FROM received_at)::float8 FROM t ORDER BY series_id"
        ).fetchall()
    assert got == [
        (7, 1_700_000_000.123456, 21.5, None, 1_700_000_001.5),
        (8, 1_700_000_000.0, None, "alarm", 1_700_000_002.25),
        (9, 946_684_800.0, -0.0, None, 946_684_800.000001),
    ]


def test_run_id_comes_first_in_the_sandbox_layout(database_url: str) -> None:
    rows = [("run-a", 1, 1_700_000_000.5, None, "ok", 1_700_000_000.5)]
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "CREATE TEMP TABLE t (run_id text, series_id int4, ts timestamptz,"
            " value float8, state text, received_at timestamptz)"
        )
        with conn.cursor() as cur, cur.copy("COPY t FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(encode_copy_rows(rows, with_run_id=True))
        got = conn.execute("SELECT run_id, series_id, state FROM t").fetchall()
    assert got == [("run-a", 1, "ok")]
