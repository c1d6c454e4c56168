-- Gateway-wide values kept across restarts, such as the key of stream cursors (SSE ids).
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
