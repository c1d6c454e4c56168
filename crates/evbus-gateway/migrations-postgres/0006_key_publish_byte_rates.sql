-- A key's own publish byte rate (bytes of request bodies per second on POST /v1/events);
-- NULL for the gateway's default (`evbus serve --publish-bytes-per-second`).
ALTER TABLE api_keys ADD COLUMN publish_bytes_per_second BIGINT;
