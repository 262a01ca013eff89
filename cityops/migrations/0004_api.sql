-- People and machines that use the control API, their browser sessions and
-- bearer tokens, failed logins (rate limiting shared by every API instance),
-- and the audit log of everything that changes state.
CREATE TABLE users (
    name          text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    role          text NOT NULL CHECK (role IN ('operator', 'responder', 'engineer', 'admin')),
    -- argon2id, PHC string format
    password_hash text NOT NULL,
    display_name  text NOT NULL DEFAULT '',
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    password_changed_at timestamptz NOT NULL DEFAULT now()
);

-- A browser session. Only the SHA-256 of the cookie's random secret is kept,
-- so a leaked table does not give sessions away.
CREATE TABLE sessions (
    secret_sha256 bytea PRIMARY KEY,
    user_name     text NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    csrf_token    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    remote_addr   text
);
CREATE INDEX sessions_user ON sessions (user_name);

-- A bearer token for an API client, issued and revoked by an admin. The token
-- is shown once; only its SHA-256 is kept.
CREATE TABLE api_tokens (
    id            text PRIMARY KEY,
    secret_sha256 bytea NOT NULL UNIQUE,
    user_name     text NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    description   text NOT NULL DEFAULT '',
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    last_used_at  timestamptz
);

-- Failed logins, per user name and per address, for the rate limit.
CREATE TABLE login_failures (
    at          timestamptz NOT NULL DEFAULT now(),
    user_name   text NOT NULL,
    remote_addr text NOT NULL
);
CREATE INDEX login_failures_user ON login_failures (user_name, at);
CREATE INDEX login_failures_addr ON login_failures (remote_addr, at);

-- Who did what, when, from where. Never dropped by retention; the personal
-- parts (actor, remote_addr) can be pseudonymised after a configured period.
CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    target      text NOT NULL DEFAULT '',
    outcome     text NOT NULL DEFAULT 'ok' CHECK (outcome IN ('ok', 'denied', 'failed')),
    remote_addr text,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_at ON audit_log (at DESC);
CREATE INDEX audit_log_actor ON audit_log (actor, at DESC);
