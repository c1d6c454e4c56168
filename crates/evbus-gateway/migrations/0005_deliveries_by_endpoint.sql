-- Claiming deliveries reads each endpoint's first due deliveries through this index, and the
-- expired leases through the next, so a claim costs the same with ten pending deliveries as
-- with a million (it used to rank every due delivery on every claim).
CREATE INDEX deliveries_webhook_due ON deliveries (webhook_id, state, next_attempt_at);
CREATE INDEX deliveries_lease ON deliveries (state, lease_until);
