-- Alerts (one row per alert), every transition in alert_events, incidents
-- that group alert floods. The database is the truth; the broker only carries
-- events. One open alert per (rule, subject, source, run) is enforced here,
-- so two evaluator instances cannot open the same alert twice.
CREATE TABLE incidents (
    id        text PRIMARY KEY,
    district  text NOT NULL,
    opened_at timestamptz NOT NULL,
    source    text NOT NULL DEFAULT 'live' CHECK (source IN ('live', 'replay', 'drill'))
);

CREATE TABLE alerts (
    id               text PRIMARY KEY,
    rule_id          text NOT NULL,
    subject          text NOT NULL,
    severity         text NOT NULL CHECK (severity IN ('critical', 'major', 'minor', 'warning')),
    state            text NOT NULL CHECK (state IN (
                         'active_unacked', 'active_acked', 'cleared_unacked', 'closed',
                         'shelved', 'suppressed', 'out_of_service')),
    version          integer NOT NULL,
    message          text NOT NULL,
    raised_at        timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    active           boolean NOT NULL,
    acked            boolean NOT NULL,
    occurrences      integer NOT NULL,
    value            double precision,
    device_id        text,
    channel          text,
    district         text NOT NULL DEFAULT '',
    acked_by         text,
    acked_at         timestamptz,
    cleared_at       timestamptz,
    closed_at        timestamptz,
    unacked_since    timestamptz NOT NULL,
    assignee         text,
    shelved_until    timestamptz,
    shelve_reason    text,
    escalation_level integer NOT NULL DEFAULT 0,
    chattering       boolean NOT NULL DEFAULT false,
    incident_id      text REFERENCES incidents (id),
    source           text NOT NULL CHECK (source IN ('live', 'replay', 'drill')),
    run_id           text
);
CREATE UNIQUE INDEX alerts_one_open ON alerts (rule_id, subject, source, run_id)
    NULLS NOT DISTINCT WHERE state <> 'closed';
CREATE INDEX alerts_open_by_district ON alerts (district) WHERE state <> 'closed';
CREATE INDEX alerts_raised_at ON alerts (raised_at DESC);

CREATE TABLE alert_events (
    alert_id   text NOT NULL REFERENCES alerts (id),
    version    integer NOT NULL,
    action     text NOT NULL,
    from_state text NOT NULL,
    to_state   text NOT NULL,
    actor      text NOT NULL,
    at         timestamptz NOT NULL,
    note       text NOT NULL DEFAULT '',
    notify     text,
    PRIMARY KEY (alert_id, version)
);
