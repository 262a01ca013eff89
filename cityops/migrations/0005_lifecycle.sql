-- Data lifecycle: roll-ups of numeric readings per series (1 minute, 1 hour),
-- their incremental progress, and an index that finds late readings.
-- Continuous aggregates and job policies are not in the Apache-2 edition:
-- cityops maintains these tables itself (ingest/lifecycle.py, docs/data-lifecycle.md).

-- One row per (series, minute) with at least one numeric reading. sum, not
-- avg, so that coarser buckets combine exactly: avg = sum / readings.
CREATE TABLE readings_1m (
    series_id integer NOT NULL,
    bucket    timestamptz NOT NULL,
    readings  bigint NOT NULL,
    min       double precision NOT NULL,
    max       double precision NOT NULL,
    sum       double precision NOT NULL
);
SELECT create_hypertable('readings_1m', by_range('bucket', INTERVAL '7 days'),
                         create_default_indexes => false);
-- The upsert key (idempotent recompute) and the history read path.
CREATE UNIQUE INDEX readings_1m_series_bucket ON readings_1m (series_id, bucket DESC);

-- One row per (series, hour), computed from readings_1m.
CREATE TABLE readings_1h (
    series_id integer NOT NULL,
    bucket    timestamptz NOT NULL,
    readings  bigint NOT NULL,
    min       double precision NOT NULL,
    max       double precision NOT NULL,
    sum       double precision NOT NULL
);
SELECT create_hypertable('readings_1h', by_range('bucket', INTERVAL '90 days'),
                         create_default_indexes => false);
CREATE UNIQUE INDEX readings_1h_series_bucket ON readings_1h (series_id, bucket DESC);

-- Incremental progress (both roll-ups advance together, in one transaction).
-- complete_before: every bucket before it has been computed from what the
-- source held at updated_at (NULL: never ran). settled_before =
-- complete_before - the lateness window: history serves roll-ups before it
-- and raw readings after. late_scan_from: readings received from then on are
-- checked for device times before the recompute window (late readings).
CREATE TABLE rollup_watermarks (
    rollup          text PRIMARY KEY CHECK (rollup IN ('1m', '1h')),
    complete_before timestamptz,
    settled_before  timestamptz,
    late_scan_from  timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
INSERT INTO rollup_watermarks (rollup) VALUES ('1m'), ('1h');

-- The end of the newest chunk retention has dropped, per hypertable. No
-- roll-up is recomputed from a source older than this (it would be partial).
CREATE TABLE retention_horizons (
    hypertable     text PRIMARY KEY CHECK (hypertable IN ('readings', 'readings_1m', 'readings_1h')),
    dropped_before timestamptz NOT NULL
);

-- Late readings are found by receive time. received_at follows the physical
-- order of a chunk (rows are appended as they arrive), so a BRIN index costs
-- next to nothing on the insert path and skips every block range of a chunk
-- that received nothing new; unsummarised ranges are always scanned, so it
-- never misses a row.
CREATE INDEX readings_received_at_brin ON readings USING brin (received_at)
    WITH (pages_per_range = 32, autosummarize = on);
