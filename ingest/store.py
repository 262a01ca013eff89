"""The storage writer: one transaction per batch, idempotent.

Readings are written with binary COPY straight into the hypertable, inside a
savepoint (FACTS.md: about 470,000 rows/s). A redelivered message makes that
COPY fail on the unique key ``(series_id, ts)``; the batch then falls back
to COPY into a temporary staging table and ``INSERT … SELECT … ON CONFLICT
DO NOTHING`` (about 158,000 rows/s), so a redelivered message is stored once.
Redeliveries are rare (after a crash or a lost connection), so the fast path
carries the load.

The replay sandbox uses the same writer on a connection whose
``search_path`` is ``replay, public``: the same table names resolve to the
``replay`` schema, whose readings and presence events also carry the run id
(runs never mix, a replay never touches a live table).

Devices and series are registered on first sight in the same transaction; ids
are cached only after the commit, so a rolled-back batch never leaves a stale
id behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import AsyncConnection, sql

from ingest.batch import Batch, StoreResult
from ingest.errors import StorageUnavailable
from ingest.model import DeadLetter, DeviceRef, Presence, Reading

log = logging.getLogger(__name__)

_STAGING = """
CREATE TEMPORARY TABLE IF NOT EXISTS ingest_staging (
    run_id      text,
    series_id   integer NOT NULL,
    ts          double precision NOT NULL,
    value       double precision,
    state       text,
    received_at double precision NOT NULL
) ON COMMIT DELETE ROWS
"""

_COLUMNS = "series_id, ts, value, state, received_at"
_COPY_DIRECT = f"COPY readings ({_COLUMNS}) FROM STDIN (FORMAT BINARY)"
_COPY_STAGED = f"COPY ingest_staging ({_COLUMNS}) FROM STDIN (FORMAT BINARY)"
_TYPES_STAGED = ["int4", "float8", "float8", "text", "float8"]
# (series id, device time, value, state, receive time), times in epoch seconds;
# in the sandbox the run id comes first.
_Row = tuple[object, ...]

_PG_EPOCH_S = 946_684_800.0  # 2000-01-01T00:00:00Z, PostgreSQL's timestamp origin


_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" * 2
_COPY_TRAILER = b"\xff\xff"
# A numeric reading: 5 fields; (4, series id) (8, ts) (8, value) (NULL state) (8, receive time)
_NUMERIC_ROW = struct.Struct("!hiiiqidiiq")
# A state reading: the same up to the state's length, then its bytes, then the receive time
_STATE_HEAD = struct.Struct("!hiiiqii")
_STATE_TAIL = struct.Struct("!iq")
_FIELD_LEN = struct.Struct("!i")


def encode_copy_rows(rows: Sequence[_Row], *, with_run_id: bool = False) -> bytes:
    """Rows as a complete binary COPY stream for ``readings``.

    Packing each row with one precompiled ``struct`` costs a fraction of
    psycopg's per-value ``write_row``; this is the hot path of ingest. The
    layout is PostgreSQL's binary COPY format: a signature, then per row a
    field count and each field as a length (-1 for NULL) and its bytes, then a
    trailer. Times are epoch seconds, sent as microseconds since 2000-01-01.
    """
    out = [_COPY_SIGNATURE]
    append = out.append
    numeric = _NUMERIC_ROW.pack
    state_head = _STATE_HEAD.pack
    state_tail = _STATE_TAIL.pack
    field_len = _FIELD_LEN.pack
    epoch = _PG_EPOCH_S
    fields = 6 if with_run_id else 5
    for row in rows:
        if with_run_id:
            run = str(row[0]).encode()
            row = row[1:]  # noqa: PLW2901 (the rest has the live layout)
        sid, ts, value, state, received = row
        ts_us = round((float(ts) - epoch) * 1_000_000)  # type: ignore[arg-type]
        recv_us = round((float(received) - epoch) * 1_000_000)  # type: ignore[arg-type]
        if with_run_id:
            # The run id comes first: a field count of 6, then the text field.
            append(b"\x00\x06" + field_len(len(run)) + run)
            head_skip = 2
        else:
            head_skip = 0
        if state is None:
            packed = numeric(fields, 4, sid, 8, ts_us, 8, value, -1, 8, recv_us)
        else:
            text = str(state).encode()
            packed = (
                state_head(fields, 4, sid, 8, ts_us, -1, len(text))
                + text
                + state_tail(8, recv_us)
            )
        append(packed[head_skip:] if head_skip else packed)
    append(_COPY_TRAILER)
    return b"".join(out)


_MOVE_STAGED = """
INSERT INTO readings (ts, series_id, value, state, received_at)
SELECT to_timestamp(ts), series_id, value, state, to_timestamp(received_at)
FROM ingest_staging
ON CONFLICT DO NOTHING
"""
_MOVE_STAGED_SANDBOX = """
INSERT INTO readings (run_id, ts, series_id, value, state, received_at)
SELECT run_id, to_timestamp(ts), series_id, value, state, to_timestamp(received_at)
FROM ingest_staging
ON CONFLICT DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """Connection timing of the writer."""

    connect_timeout_s: float = 5.0
    statement_timeout_s: float = 30.0


def _presence_rank(session: int, state: str) -> int:
    # Within a session a device goes online, then offline (LWT): offline wins.
    return session * 2 + (1 if state == "offline" else 0)


class ReadingStore:
    """Writes batches to TimescaleDB; one connection, reopened after failures."""

    def __init__(
        self, conninfo: str, options: StoreOptions | None = None, *, sandbox: bool = False
    ) -> None:
        self._conninfo = conninfo
        self._options = options or StoreOptions()
        self.sandbox = sandbox
        if sandbox:
            self._copy_direct = f"COPY readings (run_id, {_COLUMNS}) FROM STDIN (FORMAT BINARY)"
            self._copy_staged = (
                f"COPY ingest_staging (run_id, {_COLUMNS}) FROM STDIN (FORMAT BINARY)"
            )
            self._types_staged = ["text", *_TYPES_STAGED]
            self._move_staged = _MOVE_STAGED_SANDBOX
        else:
            self._copy_direct = _COPY_DIRECT
            self._copy_staged = _COPY_STAGED
            self._types_staged = _TYPES_STAGED
            self._move_staged = _MOVE_STAGED
        self._conn: AsyncConnection[tuple[object, ...]] | None = None
        # device id -> (domain, district) as registered
        self._devices: dict[str, tuple[str, str]] = {}
        # (device id, channel) -> series id
        self._series: dict[tuple[str, str], int] = {}

    async def _connection(self) -> AsyncConnection[tuple[object, ...]]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            conn = await AsyncConnection.connect(
                self._conninfo,
                connect_timeout=max(1, int(self._options.connect_timeout_s)),
                options=(
                    f"-c statement_timeout={int(self._options.statement_timeout_s * 1000)}"
                    + (" -c search_path=replay,public" if self.sandbox else "")
                ),
            )
            await conn.execute(_STAGING)
            await conn.commit()
        except psycopg.Error as exc:
            msg = f"cannot connect to the database: {exc}"
            raise StorageUnavailable(msg) from exc
        self._conn = conn
        return conn

    def home_of(self, device_id: str) -> tuple[str, str] | None:
        """The (domain, district) a device is registered in, if known here."""
        return self._devices.get(device_id)

    async def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def check(self) -> None:
        """Open the connection now (raises ``StorageUnavailable``)."""
        await self._connection()

    async def write(self, batch: Batch) -> StoreResult:
        """Commit ``batch`` in one transaction.

        Raises:
            StorageUnavailable: the database failed; nothing of the batch is
                committed and the caller retries the same batch later.
        """
        conn = await self._connection()
        try:
            result, new_devices, new_series = await self._write(conn, batch)
            await conn.commit()
        except psycopg.Error as exc:
            await self._discard(conn)
            msg = f"batch of {len(batch)} messages not committed: {exc}"
            raise StorageUnavailable(msg) from exc
        self._devices.update(new_devices)
        self._series.update(new_series)
        return result

    async def _discard(self, conn: AsyncConnection[tuple[object, ...]]) -> None:
        with contextlib.suppress(psycopg.Error):
            await conn.rollback()
        if conn.broken or conn.closed:
            self._conn = None
        else:
            # A failed statement may leave the session in an unknown state:
            # start over with a fresh connection.
            await conn.close()
            self._conn = None

    async def _write(
        self, conn: AsyncConnection[tuple[object, ...]], batch: Batch
    ) -> tuple[StoreResult, dict[str, tuple[str, str]], dict[tuple[str, str], int]]:
        devices = {r.device.device_id: r.device for r in batch.readings}
        devices.update((p.device.device_id, p.device) for p in batch.presences)
        new_devices = await self._register_devices(conn, devices.values())
        registered = {**self._devices, **new_devices}

        # A device id belongs to one domain and district: a reading that names
        # another is refused, not silently re-homed.
        rejected: list[DeadLetter] = []
        readings: list[Reading] = []
        received: list[float] = []
        run_ids: list[str] = []
        tags = batch.reading_run_ids if self.sandbox else batch.reading_received_at
        for reading, received_at, tag in zip(
            batch.readings, batch.reading_received_at, tags, strict=True
        ):
            home = registered[reading.device.device_id]
            if home != (reading.device.domain, reading.device.district):
                rejected.append(_mismatch(reading.device, home, received_at))
                continue
            readings.append(reading)
            received.append(received_at)
            if self.sandbox:
                run_ids.append(str(tag))
        presence_tags = batch.presence_run_ids if self.sandbox else [""] * len(batch.presences)
        kept = [
            (p, tag)
            for p, tag in zip(batch.presences, presence_tags, strict=True)
            if registered[p.device.device_id] == (p.device.domain, p.device.district)
        ]
        presences = [p for p, _ in kept]
        presence_run_ids = [tag for _, tag in kept]

        new_series = await self._register_series(conn, readings)
        stored = 0
        if readings:
            series = self._series
            rows: list[_Row] = [
                (
                    series.get((r.device.device_id, r.channel))
                    or new_series[(r.device.device_id, r.channel)],
                    r.ts,
                    r.value,
                    r.state,
                    received_at,
                )
                for r, received_at in zip(readings, received, strict=True)
            ]
            if self.sandbox:
                rows = [(run_id, *row) for run_id, row in zip(run_ids, rows, strict=True)]
                await conn.execute(
                    "INSERT INTO runs (run_id) SELECT DISTINCT unnest(%s::text[])"
                    " ON CONFLICT (run_id) DO UPDATE SET last_seen = now()",
                    (sorted(set(run_ids)),),
                )
            stored = await self._copy_readings(conn, rows)
        applied = await self._write_presence(conn, presences, presence_run_ids)
        letters = [*batch.dead_letters, *rejected]
        await self._write_dead_letters(conn, letters)
        result = StoreResult(
            stored=stored,
            duplicates=len(readings) - stored,
            dead_letters=len(letters),
            presence_applied=applied,
            rejected=tuple(rejected),
        )
        return result, new_devices, new_series

    async def _copy_readings(
        self, conn: AsyncConnection[tuple[object, ...]], rows: list[_Row]
    ) -> int:
        try:
            # conn.transaction() is a savepoint inside the batch's transaction.
            async with (
                conn.transaction(),
                conn.cursor() as cur,
                cur.copy(self._copy_direct) as copy,
            ):
                await copy.write(encode_copy_rows(rows, with_run_id=self.sandbox))
            return len(rows)
        except psycopg.errors.UniqueViolation:
            pass  # a redelivery: take the deduplicating path for this batch
        async with conn.cursor() as cur:
            async with cur.copy(self._copy_staged) as copy:
                copy.set_types(self._types_staged)
                for row in rows:
                    await copy.write_row(row)
            await cur.execute(self._move_staged)
            return max(cur.rowcount, 0)

    async def _register_devices(
        self, conn: AsyncConnection[tuple[object, ...]], devices: Iterable[DeviceRef]
    ) -> dict[str, tuple[str, str]]:
        missing = [d for d in devices if d.device_id not in self._devices]
        if not missing:
            return {}
        ids = [d.device_id for d in missing]
        await conn.execute(
            "INSERT INTO devices (id, domain, district)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])"
            " ON CONFLICT (id) DO NOTHING",
            (ids, [d.domain for d in missing], [d.district for d in missing]),
        )
        cur = await conn.execute(
            "SELECT id, domain, district FROM devices WHERE id = ANY(%s)", (ids,)
        )
        return {str(i): (str(dom), str(dis)) for i, dom, dis in await cur.fetchall()}

    async def _register_series(
        self, conn: AsyncConnection[tuple[object, ...]], readings: Sequence[Reading]
    ) -> dict[tuple[str, str], int]:
        missing: dict[tuple[str, str], str | None] = {}
        series = self._series
        for r in readings:
            key = (r.device.device_id, r.channel)
            if key not in series and key not in missing:
                missing[key] = r.unit
        if not missing:
            return {}
        keys = list(missing)
        dev = [k[0] for k in keys]
        chan = [k[1] for k in keys]
        await conn.execute(
            "INSERT INTO series (device_id, channel, unit)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])"
            " ON CONFLICT (device_id, channel) DO NOTHING",
            (dev, chan, [missing[k] for k in keys]),
        )
        cur = await conn.execute(
            "SELECT s.id, s.device_id, s.channel FROM series s"
            " JOIN unnest(%s::text[], %s::text[]) AS k(device_id, channel)"
            " USING (device_id, channel)",
            (dev, chan),
        )
        return {(str(d), str(c)): int(str(i)) for i, d, c in await cur.fetchall()}

    async def _write_presence(
        self,
        conn: AsyncConnection[tuple[object, ...]],
        presences: Sequence[Presence],
        run_ids: Sequence[str],
    ) -> int:
        if not presences:
            return 0
        columns = (
            [p.device.device_id for p in presences],
            [p.session for p in presences],
            [p.state for p in presences],
            [p.ts for p in presences],
        )
        if self.sandbox:
            await conn.execute(
                "INSERT INTO presence_events (run_id, device_id, session, state, received_at)"
                " SELECT r, d, s, st, to_timestamp(t) FROM unnest(%s::text[], %s::text[],"
                " %s::bigint[], %s::text[], %s::float8[]) AS v(r, d, s, st, t)"
                " ON CONFLICT DO NOTHING",
                (list(run_ids), *columns),
            )
        else:
            await conn.execute(
                "INSERT INTO presence_events (device_id, session, state, received_at)"
                " SELECT d, s, st, to_timestamp(t) FROM unnest(%s::text[], %s::bigint[],"
                " %s::text[], %s::float8[]) AS v(d, s, st, t)"
                " ON CONFLICT DO NOTHING",
                columns,
            )
        # The newest status per device wins; a lower session is stale.
        newest: dict[str, Presence] = {}
        for p in presences:
            old = newest.get(p.device.device_id)
            if old is None or _presence_rank(p.session, p.state) >= _presence_rank(
                old.session, old.state
            ):
                newest[p.device.device_id] = p
        chosen = list(newest.values())
        cur = await conn.execute(
            "UPDATE devices d SET presence = v.st, presence_session = v.s,"
            " presence_changed_at = to_timestamp(v.t)"
            " FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::float8[]) AS v(id, s, st, t)"
            " WHERE d.id = v.id AND (d.presence_session IS NULL"
            "   OR d.presence_session * 2 + (d.presence = 'offline')::int"
            "      < v.s * 2 + (v.st = 'offline')::int)",
            (
                [p.device.device_id for p in chosen],
                [p.session for p in chosen],
                [p.state for p in chosen],
                [p.ts for p in chosen],
            ),
        )
        return max(cur.rowcount, 0)

    async def _write_dead_letters(
        self, conn: AsyncConnection[tuple[object, ...]], letters: Sequence[DeadLetter]
    ) -> None:
        if not letters:
            return
        await conn.execute(
            sql.SQL(
                "INSERT INTO dead_letters (digest, topic, payload, reason,"
                " first_received_at, last_received_at)"
                " SELECT g, tp, pl, r, to_timestamp(t), to_timestamp(t)"
                " FROM unnest(%s::bytea[], %s::text[], %s::bytea[], %s::text[], %s::float8[])"
                "   AS v(g, tp, pl, r, t)"
                " ON CONFLICT (digest) DO UPDATE SET occurrences = dead_letters.occurrences + 1,"
                " last_received_at = greatest(dead_letters.last_received_at,"
                " excluded.last_received_at)"
            ),
            (
                [dead_letter_digest(d.topic, d.payload, d.reason) for d in letters],
                [d.topic for d in letters],
                [d.payload for d in letters],
                [d.reason for d in letters],
                [d.received_at for d in letters],
            ),
        )


def dead_letter_digest(topic: str, payload: bytes, reason: str) -> bytes:
    """Identity of a dead letter: a redelivered message maps to the same row."""
    h = hashlib.sha256(topic.encode("utf-8", "surrogatepass"))
    h.update(b"\0")
    h.update(payload)
    h.update(b"\0")
    h.update(reason.encode())
    return h.digest()


def _mismatch(device: DeviceRef, home: tuple[str, str], received_at: float) -> DeadLetter:
    return DeadLetter(
        topic=f"city/{device.domain}/{device.district}/{device.device_id}",
        payload=b"",
        reason=(
            f"device {device.device_id!r} is registered in {home[0]}/{home[1]},"
            f" not {device.domain}/{device.district}"
        ),
        received_at=received_at,
    )
