-- The replay sandbox: traffic replayed under cityops/replay/{run_id}/… is
-- stored here, never in the live tables. Same shapes as the live tables, with
-- the run id in readings and presence events so runs never mix.
CREATE SCHEMA replay;

CREATE TABLE replay.runs (
    run_id     text PRIMARY KEY,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE replay.devices (
    id                  text PRIMARY KEY,
    domain              text NOT NULL CHECK (domain IN ('traffic', 'facility', 'emergency')),
    district            text NOT NULL,
    first_seen          timestamptz NOT NULL DEFAULT now(),
    presence            text NOT NULL DEFAULT 'unknown'
                        CHECK (presence IN ('unknown', 'online', 'offline')),
    presence_session    bigint,
    presence_changed_at timestamptz
);

CREATE TABLE replay.series (
    id         integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id  text NOT NULL REFERENCES replay.devices (id),
    channel    text NOT NULL,
    unit       text,
    first_seen timestamptz NOT NULL DEFAULT now(),
    UNIQUE (device_id, channel)
);

CREATE TABLE replay.readings (
    run_id      text NOT NULL,
    ts          timestamptz NOT NULL,
    series_id   integer NOT NULL,
    value       double precision,
    state       text,
    received_at timestamptz NOT NULL,
    CHECK ((value IS NULL) <> (state IS NULL))
);
SELECT create_hypertable('replay.readings', by_range('ts', INTERVAL '1 day'));
CREATE UNIQUE INDEX replay_readings_run_series_ts ON replay.readings (run_id, series_id, ts DESC);

CREATE TABLE replay.dead_letters (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    digest            bytea NOT NULL UNIQUE,
    topic             text NOT NULL,
    payload           bytea NOT NULL,
    reason            text NOT NULL,
    first_received_at timestamptz NOT NULL,
    last_received_at  timestamptz NOT NULL,
    occurrences       bigint NOT NULL DEFAULT 1
);

CREATE TABLE replay.presence_events (
    run_id      text NOT NULL,
    device_id   text NOT NULL REFERENCES replay.devices (id),
    session     bigint NOT NULL,
    state       text NOT NULL CHECK (state IN ('online', 'offline')),
    received_at timestamptz NOT NULL,
    PRIMARY KEY (run_id, device_id, session, state)
);
