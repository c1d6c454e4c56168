-- Rows given back with a delay (a nack with a backoff) are kept apart from the rows a claim
-- reads. A claim reads its partition in delivery order (id) and takes the visible rows; it
-- used to step over every delayed row at the head of the partition, on every claim (200,000
-- rows delayed by an outage: about 20-40 ms a claim, holding SQLite's write lock all that
-- time). A delayed row now carries its due time in `delayed_until` (0: not delayed), which
-- sorts it out of the claim's range of `evbus_deliveries_claim`; claims move the delayed rows
-- that came due back (`delayed_until` = 0, a range of the same index) and read only rows that
-- are not delayed. A row keeps its id while delayed, so it is still delivered ahead of the
-- events published after it. `evbus_deliveries_by_part` stays for processes of earlier
-- versions (an older `evbus` CLI, a rolling upgrade), whose claims read it.
ALTER TABLE evbus_deliveries ADD COLUMN delayed_until INTEGER NOT NULL DEFAULT 0;
CREATE INDEX evbus_deliveries_claim ON evbus_deliveries (part, delayed_until, id);
