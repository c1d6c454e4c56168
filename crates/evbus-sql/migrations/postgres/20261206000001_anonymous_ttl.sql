-- Each anonymous subscription's own TTL, written by its keep-alive: the cleanup of any process
-- deletes one not seen for that long (for the cleaner's own TTL when absent: rows of earlier
-- versions). A process whose `anonymous_ttl_ms` was shorter than another's keep-alive interval
-- deleted that process's live subscriptions.
ALTER TABLE evbus_parts ADD COLUMN IF NOT EXISTS ttl_ms BIGINT;
