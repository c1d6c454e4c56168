-- Events are unique per (source, id), as CloudEvents defines it, not per id alone: an event
-- of another producer with the same id is logged and delivered, never taken for a redelivery.

CREATE TABLE events_by_source (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    source      TEXT NOT NULL,
    id          TEXT NOT NULL,
    type        TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    fingerprint TEXT,                     -- SHA-256 of the curated content; NULL for older rows
    body        TEXT NOT NULL,            -- curated structured CloudEvent (JSON)
    UNIQUE (source, id)
);
INSERT INTO events_by_source (seq, source, id, type, received_at, fingerprint, body)
    SELECT seq, COALESCE(json_extract(body, '$.source'), ''), id, type, received_at, NULL, body
    FROM events;
-- Keep the log positions growing past every position already handed out (SSE ids), even
-- ones whose events were pruned.
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'events_by_source', 0
    WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'events_by_source');
UPDATE sqlite_sequence
    SET seq = MAX(seq, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0))
    WHERE name = 'events_by_source';
DROP TABLE events;
ALTER TABLE events_by_source RENAME TO events;
CREATE INDEX events_type_seq ON events (type, seq);
CREATE INDEX events_received_at ON events (received_at);

-- Events accepted by POST /v1/events, per (source, id): an identical re-post is idempotent,
-- a different one under the same source and id is refused (409).
CREATE TABLE published (
    source      TEXT NOT NULL,
    id          TEXT NOT NULL,
    fingerprint TEXT NOT NULL,            -- SHA-256 of type, subject, partition key and data
    sent        INTEGER NOT NULL,         -- 1 once the bus took it
    received_at INTEGER NOT NULL,
    PRIMARY KEY (source, id)
);
CREATE INDEX published_received_at ON published (received_at);
