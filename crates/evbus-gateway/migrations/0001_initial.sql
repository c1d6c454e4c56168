-- evbus gateway state. Times are Unix milliseconds (UTC).

-- API keys: only SHA-256 of the secret part is stored.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    secret_hash BLOB NOT NULL,
    subscribe   TEXT NOT NULL,            -- JSON array of type names / patterns
    publish     TEXT NOT NULL,            -- JSON array of type names / patterns
    admin       INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    revoked_at  INTEGER
);

CREATE TABLE webhooks (
    id                    TEXT PRIMARY KEY,
    owner_key_id          TEXT NOT NULL,
    url                   TEXT NOT NULL,
    event_types           TEXT NOT NULL,  -- JSON array of type names
    description           TEXT NOT NULL,
    allow                 TEXT,           -- JSON array of JSON pointers, or NULL
    secret                TEXT NOT NULL,
    previous_secret       TEXT,
    previous_secret_until INTEGER,
    enabled               INTEGER NOT NULL,
    disabled_reason       TEXT,
    failing_since         INTEGER,
    created_at            INTEGER NOT NULL
);

-- The curated event log: webhook deliveries and streams read events from here.
CREATE TABLE events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    type        TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    body        TEXT NOT NULL             -- curated structured CloudEvent (JSON)
);
CREATE INDEX events_type_seq ON events (type, seq);
CREATE INDEX events_received_at ON events (received_at);

-- The delivery outbox: one row per (webhook, event) to deliver, with its retry state.
CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id      TEXT NOT NULL,
    event_seq       INTEGER NOT NULL,
    replay          INTEGER NOT NULL DEFAULT 0,
    state           TEXT NOT NULL,        -- pending | in_flight | delivered | failed
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER,
    created_at      INTEGER NOT NULL
);
CREATE UNIQUE INDEX deliveries_once ON deliveries (webhook_id, event_seq) WHERE replay = 0;
CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX deliveries_event ON deliveries (event_seq);

CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id  TEXT NOT NULL,
    delivery_id INTEGER NOT NULL,
    event_id    TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    status      INTEGER,
    latency_ms  INTEGER NOT NULL,
    error       TEXT,
    response    TEXT
);
CREATE INDEX attempts_webhook ON attempts (webhook_id, id);
