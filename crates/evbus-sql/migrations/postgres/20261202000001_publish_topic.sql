-- Publishing to a topic in one round trip. A publisher holds the topic's advisory lock shared
-- while it inserts (a subscription replaying the topic from the start holds it exclusive, so
-- no event falls between its copy and its new partition). The insert must read the partitions
-- after the lock is granted: in a single statement its snapshot would predate the lock, so the
-- lock and the insert are two statements, and a PL/pgSQL function (whose statements each take
-- a fresh snapshot under READ COMMITTED) runs both in the caller's implicit transaction
-- instead of BEGIN, lock, insert, COMMIT from the client. The wake-up NOTIFY is not sent here:
-- it would serialise the commits of concurrent publishers (see src/notify.rs).
CREATE FUNCTION evbus_publish_topic(p_topic TEXT, p_bodies TEXT[])
RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('evbus-sql topic ' || p_topic));
    WITH ev AS (
        INSERT INTO evbus_events (kind, dest, body)
        SELECT 'topic', p_topic, b FROM unnest(p_bodies) WITH ORDINALITY AS t(b, n) ORDER BY n
        RETURNING id
    )
    INSERT INTO evbus_deliveries (part, event)
    SELECT p.id, ev.id FROM evbus_parts p, ev
    WHERE p.kind = 'topic' AND p.dest = p_topic
    ORDER BY p.id, ev.id;
END
$$;
