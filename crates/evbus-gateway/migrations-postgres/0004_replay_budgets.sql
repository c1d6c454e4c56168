-- Replay budgets (`GatewayConfig::max_replayed_per_day`): the events replays queued to each
-- webhook in its current window, which opens with the first replay that queues an event and
-- lasts 24 h. A row outlives its webhook until its window ends (pruning drops it later), so
-- deleting a webhook and registering it again gives its key no more budget: the key's open
-- windows are summed through the second index.
CREATE TABLE replay_budgets (
    webhook_id     TEXT PRIMARY KEY,
    owner_key_id   TEXT NOT NULL,
    window_ends_at BIGINT NOT NULL,
    replayed       BIGINT NOT NULL
);
CREATE INDEX replay_budgets_owner ON replay_budgets (owner_key_id, window_ends_at);
