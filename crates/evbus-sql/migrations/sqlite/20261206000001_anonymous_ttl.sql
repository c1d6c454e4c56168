-- Each anonymous subscription's own TTL, written by its keep-alive: the cleanup deletes one not
-- seen for that long (for the cleaner's own TTL when absent: rows of earlier versions).
ALTER TABLE evbus_parts ADD COLUMN ttl_ms INTEGER;
