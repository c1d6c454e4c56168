-- evbus-sql transport tables (SQLite). Times are milliseconds since the Unix epoch, by the
-- clock of the one process that owns the file. AUTOINCREMENT: ids are never reused, so a
-- late settlement cannot hit a newer row.

CREATE TABLE evbus_parts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('topic', 'queue')),
    dest TEXT NOT NULL,
    name TEXT NOT NULL,
    seen_at INTEGER NOT NULL,
    UNIQUE (kind, dest, name)
);

CREATE TABLE evbus_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    dest TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX evbus_events_by_dest ON evbus_events (kind, dest, id);
CREATE INDEX evbus_events_by_age ON evbus_events (created_at);

CREATE TABLE evbus_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    part INTEGER NOT NULL REFERENCES evbus_parts (id) ON DELETE CASCADE,
    event INTEGER NOT NULL REFERENCES evbus_events (id) ON DELETE CASCADE,
    visible_at INTEGER NOT NULL,
    attempt INTEGER NOT NULL
);
CREATE INDEX evbus_deliveries_by_part ON evbus_deliveries (part, id);
CREATE INDEX evbus_deliveries_by_event ON evbus_deliveries (event);
