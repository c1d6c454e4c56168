-- evbus gateway state on PostgreSQL, in a schema of its own (default `evbus_gateway`).
-- Times are Unix milliseconds (UTC), as in the SQLite store, so both behave the same.

-- API keys: only SHA-256 of the secret part is stored.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    secret_hash BYTEA NOT NULL,
    subscribe   TEXT[] NOT NULL,          -- type names / patterns
    publish     TEXT[] NOT NULL,          -- type names / patterns
    admin       BOOLEAN NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    revoked_at  BIGINT
);

CREATE TABLE webhooks (
    id                    TEXT PRIMARY KEY,
    owner_key_id          TEXT NOT NULL,
    url                   TEXT NOT NULL,
    event_types           TEXT[] NOT NULL,
    description           TEXT NOT NULL,
    allow                 TEXT[],         -- JSON pointers, or NULL
    secret                TEXT NOT NULL,  -- sealed (`sealed:v1:`) with a secrets key
    previous_secret       TEXT,
    previous_secret_until BIGINT,
    enabled               BOOLEAN NOT NULL,
    disabled_reason       TEXT,
    failing_since         BIGINT,
    created_at            BIGINT NOT NULL
);

-- The curated event log, shared by every instance: webhook deliveries and streams (with
-- their Last-Event-ID resume) read events from here. Positions are handed out in commit
-- order (ingest takes the `ingest` turn below), so a reader that sees position N sees every
-- position below N that will ever exist.
CREATE TABLE events (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      TEXT NOT NULL,
    id          TEXT NOT NULL,
    type        TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    fingerprint TEXT,                     -- SHA-256 of the curated content
    body        TEXT NOT NULL,            -- curated structured CloudEvent (JSON)
    UNIQUE (source, id)
);
CREATE INDEX events_type_seq ON events (type, seq);
CREATE INDEX events_received_at ON events (received_at);

-- The delivery outbox: one row per (webhook, event) to deliver, with its retry state and the
-- lease of the instance attempting it.
CREATE TABLE deliveries (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id      TEXT NOT NULL,
    event_seq       BIGINT NOT NULL,
    replay          BOOLEAN NOT NULL DEFAULT FALSE,
    state           TEXT NOT NULL,        -- pending | in_flight | delivered | failed
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until     BIGINT,
    created_at      BIGINT NOT NULL
);
CREATE UNIQUE INDEX deliveries_once ON deliveries (webhook_id, event_seq) WHERE NOT replay;
CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX deliveries_event ON deliveries (event_seq);

CREATE TABLE attempts (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id  TEXT NOT NULL,
    delivery_id BIGINT NOT NULL,
    event_id    TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    at          BIGINT NOT NULL,
    status      INTEGER,
    latency_ms  BIGINT NOT NULL,
    error       TEXT,
    response    TEXT
);
CREATE INDEX attempts_webhook ON attempts (webhook_id, id);

-- Events accepted by POST /v1/events, per (source, id).
CREATE TABLE published (
    source      TEXT NOT NULL,
    id          TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    sent        BOOLEAN NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (source, id)
);
CREATE INDEX published_received_at ON published (received_at);

-- Gateway-wide values, such as the key of stream cursors (SSE ids), the same for every
-- instance.
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

-- Turns: one row per operation that instances take one at a time (`SELECT ... FOR UPDATE`
-- inside its transaction). `ingest`: log positions in commit order. `claim`: delivery claims,
-- so per-key in-flight limits count every instance's leases exactly.
CREATE TABLE turns (
    name TEXT PRIMARY KEY
);
INSERT INTO turns (name) VALUES ('ingest'), ('claim');
