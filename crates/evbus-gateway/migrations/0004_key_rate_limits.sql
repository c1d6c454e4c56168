-- A key's own request rate limit (token bucket): both set, or both NULL for the gateway's
-- default (`evbus serve --rate-limit`, `--rate-limit-burst`).
ALTER TABLE api_keys ADD COLUMN rate_limit_per_second INTEGER;
ALTER TABLE api_keys ADD COLUMN rate_limit_burst INTEGER;
