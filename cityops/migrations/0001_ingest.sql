-- Devices, series, readings (hypertable), dead letters and presence history.
CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE devices (
    id                  text PRIMARY KEY,
    domain              text NOT NULL CHECK (domain IN ('traffic', 'facility', 'emergency')),
    district            text NOT NULL,
    kind                text,
    name                text,
    lat                 double precision,
    lon                 double precision,
    metadata            jsonb NOT NULL DEFAULT '{}'::jsonb,
    first_seen          timestamptz NOT NULL DEFAULT now(),
    -- newest device time and receive time of a reading
    last_seen           timestamptz,
    last_received       timestamptz,
    -- how often the device reports: SenML 'ut' when given, else learned
    expected_period_s   double precision,
    presence            text NOT NULL DEFAULT 'unknown'
                        CHECK (presence IN ('unknown', 'online', 'offline')),
    presence_session    bigint,
    presence_changed_at timestamptz,
    -- set when the device stopped reporting for longer than its expected period
    stale_since         timestamptz,
    out_of_service      boolean NOT NULL DEFAULT false
);
CREATE INDEX devices_domain_district ON devices (domain, district);

CREATE TABLE series (
    id         integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id  text NOT NULL REFERENCES devices (id),
    channel    text NOT NULL,
    unit       text,
    first_seen timestamptz NOT NULL DEFAULT now(),
    UNIQUE (device_id, channel)
);

-- ts is device time; received_at is when the ingester got the message.
CREATE TABLE readings (
    ts          timestamptz NOT NULL,
    series_id   integer NOT NULL,
    value       double precision,
    state       text,
    received_at timestamptz NOT NULL,
    CHECK ((value IS NULL) <> (state IS NULL))
);
SELECT create_hypertable('readings', by_range('ts', INTERVAL '1 day'));
-- Idempotency key: a redelivered message is stored once. A unique index on a
-- hypertable must include the time column.
CREATE UNIQUE INDEX readings_series_ts ON readings (series_id, ts DESC);

-- A message that cannot be stored. The digest of topic and payload makes a
-- redelivered message one row; repeats of the same bad payload count up.
CREATE TABLE dead_letters (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    digest            bytea NOT NULL UNIQUE,
    topic             text NOT NULL,
    payload           bytea NOT NULL,
    reason            text NOT NULL,
    first_received_at timestamptz NOT NULL,
    last_received_at  timestamptz NOT NULL,
    occurrences       bigint NOT NULL DEFAULT 1
);
CREATE INDEX dead_letters_last_received ON dead_letters (last_received_at DESC);

-- Every presence change as received (retained status topic, LWT).
CREATE TABLE presence_events (
    device_id   text NOT NULL REFERENCES devices (id),
    session     bigint NOT NULL,
    state       text NOT NULL CHECK (state IN ('online', 'offline')),
    received_at timestamptz NOT NULL,
    PRIMARY KEY (device_id, session, state)
);
