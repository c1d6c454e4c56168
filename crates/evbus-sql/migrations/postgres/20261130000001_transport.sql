-- evbus-sql transport tables (PostgreSQL), created in the transport's own schema
-- (`schema=` URL parameter, default `evbus`; the connection's search_path points there).

-- A partition: one per topic subscription (named, or anonymous `_anonymous.<hex>`) and one per
-- queue (name ''). Deliveries are claimed per partition.
CREATE TABLE evbus_parts (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('topic', 'queue')),
    dest TEXT NOT NULL,
    name TEXT NOT NULL,
    -- Last time a consumer of an anonymous subscription was seen (the cleanup deletes
    -- anonymous subscriptions of dead processes).
    seen_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (kind, dest, name)
);

-- Every published event, once, in the CloudEvents JSON format. Kept while a delivery refers
-- to it, then for the retention period (what StartPosition::Earliest replays).
CREATE TABLE evbus_events (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    dest TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX evbus_events_by_dest ON evbus_events (kind, dest, id);
CREATE INDEX evbus_events_by_age ON evbus_events (created_at);

-- One row per event and partition that has not acknowledged it yet. A consumer claims the
-- oldest visible row (FOR UPDATE SKIP LOCKED), moving visible_at past its visibility timeout
-- and counting the attempt; ack deletes the row.
CREATE TABLE evbus_deliveries (
    id BIGSERIAL PRIMARY KEY,
    part BIGINT NOT NULL REFERENCES evbus_parts (id) ON DELETE CASCADE,
    event BIGINT NOT NULL REFERENCES evbus_events (id) ON DELETE CASCADE,
    visible_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempt INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX evbus_deliveries_by_part ON evbus_deliveries (part, id);
CREATE INDEX evbus_deliveries_by_event ON evbus_deliveries (event);
