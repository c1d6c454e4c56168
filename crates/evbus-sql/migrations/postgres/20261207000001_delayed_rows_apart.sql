-- Rows given back with a delay (a nack with a backoff) are kept apart from the rows a claim
-- reads. A claim reads its partition in delivery order (id) and takes the visible rows; it
-- used to step over every delayed row at the head of the partition, on every claim (200,000
-- delayed rows: about 20-30 ms a claim). A delayed row now carries its due time in
-- `delayed_until` ('-infinity': not delayed), which sorts it out of the claim's range of
-- `evbus_deliveries_claim`; claims move the delayed rows that came due back (a range of the
-- same index) and read only rows that are not delayed. A row keeps its id while delayed, so
-- it is still delivered ahead of the events published after it. Claims and renewals write
-- `visible_at` and `attempt` only, which no index holds, so their updates stay HOT.
-- `evbus_deliveries_by_part` stays for processes of earlier versions during a rolling
-- upgrade, whose claims read it. Building the index holds writes to the table (not reads)
-- for as long as it takes: about a second per two million rows.
ALTER TABLE evbus_deliveries
    ADD COLUMN IF NOT EXISTS delayed_until TIMESTAMPTZ NOT NULL DEFAULT '-infinity';
CREATE INDEX IF NOT EXISTS evbus_deliveries_claim ON evbus_deliveries (part, delayed_until, id);
