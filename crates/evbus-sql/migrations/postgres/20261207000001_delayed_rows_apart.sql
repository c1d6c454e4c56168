-- Rows given back with a delay (a nack with a backoff) are kept apart from the rows a claim
-- reads. A claim reads its partition in delivery order (id) and takes the visible rows; it
-- used to step over every delayed row at the head of the partition, on every claim (200,000
-- delayed rows: about 20-30 ms a claim). A delayed row now carries its due time in
-- `delayed_until` ('-infinity': not delayed), which sorts it out of the claim's range of the
-- index; a claim first moves the delayed rows that came due back (a range of the same index)
-- and then reads only rows that are not delayed. A row keeps its id while delayed, so it is
-- still delivered ahead of the events published after it. Claims and renewals write
-- `visible_at` and `attempt` only, which no index holds, so their updates stay HOT. A
-- process of an earlier version still claims correctly: it reads every visible row.
ALTER TABLE evbus_deliveries
    ADD COLUMN IF NOT EXISTS delayed_until TIMESTAMPTZ NOT NULL DEFAULT '-infinity';
DROP INDEX IF EXISTS evbus_deliveries_by_part;
CREATE INDEX IF NOT EXISTS evbus_deliveries_by_part
    ON evbus_deliveries (part, delayed_until, id);
