-- A publish no longer fails when a subscription of the topic is deleted while it runs (an
-- anonymous subscription released or expired, a topic deleted). The insert read the topic's
-- partitions from its snapshot; one deleted and committed meanwhile made the insert violate
-- `evbus_deliveries_part_fkey`, and the publish failed for every subscriber. The partitions are
-- now read `FOR KEY SHARE`: one deleted meanwhile is skipped (it would get nothing anyway), and
-- a deletion that comes later waits for the publish to commit, then takes its deliveries with
-- the partition (`ON DELETE CASCADE`).
CREATE OR REPLACE FUNCTION evbus_publish_topic(p_topic TEXT, p_bodies TEXT[])
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
    ),
    parts AS (
        SELECT p.id FROM evbus_parts p
        WHERE p.kind = 'topic' AND p.dest = p_topic
        FOR KEY SHARE
    )
    INSERT INTO evbus_deliveries (part, event)
    SELECT parts.id, ev.id FROM parts, ev
    ORDER BY parts.id, ev.id;
END
$$;
