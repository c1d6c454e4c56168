//! The Lua scripts that settle, renew and take over deliveries atomically.
//!
//! Each script touches only the keys of one destination (a stream and its delayed set, which
//! share a hash tag), so they run unchanged on Redis Cluster. A delivery is identified by
//! its entry id *and* its delivery count: a settlement succeeds only while the entry is still
//! pending for this consumer with the same count, so a consumer whose delivery expired and
//! was handed out again cannot settle (or renew) the new delivery by mistake.
//!
//! The consumer passes the count exactly as Redis reported it, however large (a stock client
//! sets any count with `XCLAIM ... RETRYCOUNT`), and the scripts compare counts as numbers:
//! `tostring` of a Lua number keeps only 14 significant digits, so comparing texts would
//! refuse every settlement of an entry delivered 10^14 times or more.

use std::sync::LazyLock;

use redis::Script;

/// Idle time marking an entry as "take over now": `XCLAIM ... TIME 1` sets its last delivery
/// to the Unix epoch, so every consumer's visibility timeout has passed.
pub(crate) const RELEASED_IDLE_MS: i64 = 10 * 365 * 24 * 3600 * 1000;

/// Result of a settlement script: settled.
pub(crate) const SETTLED: i64 = 1;
/// Result of a settlement script: the entry is no longer pending (acked by another
/// consumer after a takeover, or deleted).
pub(crate) const NOT_PENDING: i64 = 0;
/// Result of a settlement script: the entry was handed out again (another consumer or a
/// later delivery owns it now).
pub(crate) const TAKEN_OVER: i64 = -1;

const CHECK_OWNER: &str = r#"
local function owned(stream, group, consumer, id, count)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if #p == 0 then return 0 end
  if p[1][2] ~= consumer or p[1][4] ~= tonumber(count) then return -1 end
  return 1
end
"#;

/// Acknowledges a batch of deliveries of one consumer ("group commit"), with exactly the
/// outcome of acknowledging them alone one after the other: each delivery is acknowledged
/// only if its entry is still pending for this consumer with the same delivery count, then
/// `XACK`ed (and `XDEL`ed on queues). Returns one result per delivery, in order
/// ([`SETTLED`], [`NOT_PENDING`] or [`TAKEN_OVER`]).
///
/// One `XPENDING` over the batch's id range, filtered to this consumer, answers the usual
/// case; a delivery it does not show (a late ack, or more of the consumer's entries in that
/// range than it lists) is checked on its own. An id acknowledged earlier in the same batch
/// is no longer pending, as it would be one call later. The entries are then acknowledged
/// with one `XACK` (and one `XDEL`). The script is atomic: nobody sees the batch half done.
///
/// KEYS: stream. ARGV: group, consumer, `1` to also delete acknowledged entries (queues),
/// the lowest and the highest id of the batch, then pairs of id and delivery count.
pub(crate) static ACK_BATCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{CHECK_OWNER}
local n = (#ARGV - 5) / 2
local mine = {{}}
local listed = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[4], ARGV[5], 2 * n + 16, ARGV[2])
for _, p in ipairs(listed) do mine[p[1]] = p[4] end
local done, acked, results = {{}}, {{}}, {{}}
for i = 6, #ARGV, 2 do
  local id, count = ARGV[i], ARGV[i + 1]
  local state
  if done[id] then
    state = 0
  elseif mine[id] then
    if mine[id] == tonumber(count) then state = 1 else state = -1 end
  else
    state = owned(KEYS[1], ARGV[1], ARGV[2], id, count)
  end
  if state == 1 then
    done[id] = true
    acked[#acked + 1] = id
  end
  results[#results + 1] = state
end
if #acked > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(acked))
  if ARGV[3] == '1' then redis.call('XDEL', KEYS[1], unpack(acked)) end
end
return results
"#
    ))
});

/// Negatively acknowledges one delivery: the entry stays pending but becomes idle "forever",
/// so the next takeover scan of any consumer redelivers it (with its count increased). With
/// a delay, a member of the delayed set holds the takeover back until it is due: the time
/// it was nacked rounded up to the millisecond, plus the delay (the takeover compares with
/// its own time rounded down, so it never comes sooner than the delay; rounded down here,
/// a redelivery came up to a millisecond early).
///
/// KEYS: stream, delayed set. ARGV: group, consumer, id, delivery count, delay in ms.
pub(crate) static NACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"redis.replicate_commands()
{CHECK_OWNER}
local state = owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
if state ~= 1 then return state end
local delay = tonumber(ARGV[5])
if delay > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.ceil(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[2], now + delay, ARGV[3] .. ' ' .. ARGV[1])
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'TIME', 1, 'JUSTID')
return 1
"#
    ))
});

/// Result of [`RENEW`]: the delivery's visibility timeout already ran out (the entry has been
/// idle for it): any consumer may take it over at its next scan, so it is not renewed.
pub(crate) const RAN_OUT: i64 = -2;
/// Result of [`RENEW`]: the delivery was given back (nacked, with or without a delay, or
/// released): its entry is idle "forever" and waits for a takeover, so it is not renewed.
pub(crate) const GIVEN_BACK: i64 = -3;
/// [`RENEW_BATCH`]: the entry is pending for this consumer but no longer in the stream
/// (trimmed): not renewed, and kept pending.
pub(crate) const TRIMMED: i64 = -4;

/// Starts one delivery's visibility timeout over: if the entry is still pending for this
/// consumer with the same delivery count, and has been idle for less than the visibility
/// timeout, `XCLAIM`s it to this same consumer with `JUSTID` (the delivery count stays, the
/// idle time starts again from 0). Returns [`SETTLED`] when renewed, [`NOT_PENDING`],
/// [`TAKEN_OVER`], [`GIVEN_BACK`] or [`RAN_OUT`].
///
/// A delivery past its timeout is refused even when nobody took it over yet: from then on
/// any consumer's next scan may claim it (this one's included), so whether a late renewal
/// succeeded would depend on when the scans happened to run. An entry given back is idle
/// "forever" ([`RELEASED_IDLE_MS`]): renewing it would reset its idle time and hold back the
/// takeover [`NACK`] asked for (or, with a delay, keep it past its due time until a whole
/// timeout later), so it is refused too (checked first: it is also idle for any timeout).
/// An entry no longer in the stream (trimmed from a topic) is not claimed by `XCLAIM`,
/// which drops it from the pending list on Redis 7 (as any consumer's takeover scan would):
/// [`NOT_PENDING`].
///
/// KEYS: stream. ARGV: group, consumer, id, delivery count, visibility timeout in ms,
/// released idle ms.
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"redis.replicate_commands()
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 then return 0 end
local e = p[1]
if e[2] ~= ARGV[2] or e[4] ~= tonumber(ARGV[4]) then return -1 end
if e[3] >= tonumber(ARGV[6]) then return -3 end
if e[3] >= tonumber(ARGV[5]) then return -2 end
if #redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID') == 0 then return 0 end
return 1
"#,
    )
});

/// Most deliveries one [`RENEW_BATCH`] call renews (the script runs in Redis as one
/// command: kept short, as the other batch scripts are).
pub(crate) const RENEW_BATCH_SIZE: usize = 512;

/// Starts the visibility timeouts of a batch of one consumer's deliveries over (those it
/// fetched ahead and has not handed out yet), with exactly the outcome of [`RENEW`] for each,
/// in one call: each delivery is renewed only if its entry is still pending for this consumer
/// with the same delivery count, was not given back and has been idle for less than the
/// visibility timeout; the entry then stays pending here and its idle time starts again from
/// 0 (`XCLAIM ... JUSTID`, one call for all of them: the delivery count stays). A delivery
/// taken over by another consumer is therefore never claimed back. Returns one result per
/// delivery, in order: [`SETTLED`] (renewed), [`NOT_PENDING`], [`TAKEN_OVER`],
/// [`GIVEN_BACK`], [`RAN_OUT`] or [`TRIMMED`].
///
/// One `XPENDING` over the batch's id range, filtered to this consumer, answers the usual
/// case (as in [`ACK_BATCH`]); a delivery it does not show is looked up on its own. An entry
/// still pending here but no longer in the stream (trimmed from a topic by retention) is
/// left alone, [`TRIMMED`]: `XCLAIM` would delete it from the pending list (Redis 7), and
/// the consumer, which holds its fields, hands it out while its timeout runs, as it did
/// before renewals (its ack still finds it pending).
///
/// KEYS: stream. ARGV: group, consumer, visibility timeout in ms, released idle ms, the
/// lowest and the highest id of the batch, then pairs of id and delivery count.
pub(crate) static RENEW_BATCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"redis.replicate_commands()
local n = (#ARGV - 6) / 2
local mine = {}
local listed = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[5], ARGV[6], 2 * n + 16, ARGV[2])
for _, p in ipairs(listed) do mine[p[1]] = p end
local visibility, released = tonumber(ARGV[3]), tonumber(ARGV[4])
local results, claim, slot = {}, {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}, {}
for i = 7, #ARGV, 2 do
  local id, count = ARGV[i], tonumber(ARGV[i + 1])
  local e = mine[id]
  if not e then e = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)[1] end
  local state
  if not e then
    state = 0
  elseif e[2] ~= ARGV[2] or e[4] ~= count then
    state = -1
  elseif e[3] >= released then
    state = -3
  elseif e[3] >= visibility then
    state = -2
  elseif #redis.call('XRANGE', KEYS[1], id, id, 'COUNT', 1) == 0 then
    -- Trimmed from the stream: XCLAIM would drop it from the pending list, and the
    -- consumer, which holds its fields, would lose it.
    state = -4
  else
    -- Renewed once XCLAIM answers with its id.
    state = 0
    claim[#claim + 1] = id
    slot[id] = #results + 1
  end
  results[#results + 1] = state
end
if #claim > 5 then
  claim[#claim + 1] = 'JUSTID'
  for _, id in ipairs(redis.call(unpack(claim))) do
    if slot[id] then results[slot[id]] = 1 end
  end
end
return results
"#,
    )
});

/// Takes over entries for this consumer: pending entries idle for at least the visibility
/// timeout (their consumer vanished, or they were nacked or released) that are not held back
/// by a delay still running. Returns `{next cursor, {{id, fields, delivery count}, ...}}`.
///
/// An entry is taken over only once the visibility timeout of the consumer holding it has
/// passed as well, when that consumer is evbus's and its name carries it
/// (`<pid>-<uuid>-v<ms>`, see the consumer module; a stock consumer named `…-v<digits>`
/// held its entries for as long as the digits said, outside review): a delivery is its consumer's for that consumer's whole timeout, whatever the
/// timeouts of the others, which is what lets a consumer acknowledge early deliveries with a
/// plain `XACK` (ADR 0021). Nacked and released entries are idle "forever" and pass.
///
/// KEYS: stream, delayed set. ARGV: group, consumer, min idle ms, start (`-` or `(<id>`),
/// count.
pub(crate) static RECLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local count = tonumber(ARGV[5])
local EVBUS_NAME = '^%d+%-' .. string.rep('%x', 32) .. '%-v(%d+)$'

local pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], ARGV[4], '+', count)
local claimed = {}
local last = nil
for _, p in ipairs(pending) do
  last = p[1]
  local member = p[1] .. ' ' .. ARGV[1]
  -- The holder's own visibility timeout, when it is an evbus consumer (`<pid>-<32 hex
  -- digits>-v<ms>`): a stock consumer whose name only ends like one keeps nothing longer.
  local holder = tonumber(string.match(p[2], EVBUS_NAME) or '0')
  if p[3] >= holder then
    local due = redis.call('ZSCORE', KEYS[2], member)
    if (not due) or tonumber(due) <= now then
      local entries = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], p[1])
      if due then redis.call('ZREM', KEYS[2], member) end
      local e = entries[1]
      if e and e[2] then
        local count = p[4] + 1
        if count >= 9007199254740992 then
          -- Past 2^53 a Lua number no longer counts exactly: take what Redis reports.
          count = redis.call('XPENDING', KEYS[1], ARGV[1], p[1], p[1], 1)[1][4]
        end
        claimed[#claimed + 1] = {e[1], e[2], count}
      end
    end
  end
end
local cursor = '-'
if last and #pending >= count then cursor = '(' .. last end
return {cursor, claimed}
"#,
    )
});

/// Deletes a topic or queue: its stream and delayed set, leaving a mark (a random value,
/// kept `ttl` ms) that tells its consumers, when they find their group gone, that it was
/// deleted rather than lost (a Redis restarted without the group). Atomic, so that no
/// consumer sees the group gone before the mark is there.
///
/// KEYS: stream, delayed set, mark. ARGV: mark value, ttl ms.
pub(crate) static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
return redis.call('DEL', KEYS[1], KEYS[2])
"#,
    )
});

/// Gives back entries this consumer fetched but never handed to the application (it is
/// shutting down, or a reply was lost): each becomes immediately available to the group
/// again, with its delivery count restored to what it was before this consumer took it.
///
/// KEYS: stream. ARGV: group, consumer, then triples of id, delivery count and the count to
/// restore (worked out by the caller: Lua numbers do not count exactly past 2^53).
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local released = 0
for i = 3, #ARGV, 3 do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #p > 0 and p[1][2] == ARGV[2] and p[1][4] == tonumber(ARGV[i + 1]) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'TIME', 1, 'RETRYCOUNT', ARGV[i + 2], 'JUSTID')
    released = released + 1
  end
end
return released
"#,
    )
});

/// The consumer that holds the entries given back by consumers that stopped: nacked or
/// released entries ("idle forever") stay pending, and pending entries need an owner, which
/// would otherwise be the stopped consumer, left in the group for good. Any consumer takes
/// them over at its next scan, as from their first owner (the name carries no visibility
/// timeout; theirs has passed anyway). It never reads, and is removed once empty.
pub(crate) const RELEASED_HOLDER: &str = "evbus.released";

/// Most given-back entries one [`LEAVE`] call moves to [`RELEASED_HOLDER`].
pub(crate) const LEAVE_BATCH: usize = 256;

/// Result of [`LEAVE`]: the consumer left the group.
pub(crate) const LEFT: i64 = 1;
/// Result of [`LEAVE`]: the consumer stays, it still owns entries not given back (a delivery
/// dropped unsettled, or handed out in a reply that was lost): deleting it would delete them.
pub(crate) const KEPT: i64 = 0;
/// Result of [`LEAVE`]: more given-back entries are left to move; call again.
pub(crate) const MORE: i64 = -1;

/// Removes a consumer that stopped from its group, unless it still owns entries it did not
/// give back (removing it would delete them from the pending list): first moves up to
/// `batch` of the entries it gave back (idle at least `released idle ms`, see
/// [`RELEASED_IDLE_MS`]) to [`RELEASED_HOLDER`], unchanged (`TIME 1`, `JUSTID`: their
/// delivery count stays), then, if it owns none any more, deletes it. Also deletes
/// [`RELEASED_HOLDER`] if it holds nothing. Returns [`LEFT`], [`KEPT`] or [`MORE`]. Called
/// only once the consumer holds no delivery (nothing of its own can be settled or given back
/// any more).
///
/// KEYS: stream. ARGV: group, consumer, released holder, batch, released idle ms.
pub(crate) static LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local batch = tonumber(ARGV[4])
local given = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[5], '-', '+', batch, ARGV[2])
for _, p in ipairs(given) do
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, p[1], 'TIME', 1, 'JUSTID')
end
if #given >= batch then return -1 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[3]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[3])
end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"#,
    )
});

/// Removes an anonymous subscription: destroys its consumer group (the stream may be gone
/// already) and removes its members of the delayed set (`<entry id> <group>`), which would
/// otherwise stay until the topic is deleted. Only for anonymous groups, whose names hold
/// no glob characters (the members are found with `ZSCAN ... MATCH`).
///
/// KEYS: stream, delayed set. ARGV: group.
pub(crate) static REMOVE_ANONYMOUS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"redis.replicate_commands()
redis.pcall('XGROUP', 'DESTROY', KEYS[1], ARGV[1])
local pattern = '* ' .. ARGV[1]
local cursor = '0'
repeat
  local r = redis.call('ZSCAN', KEYS[2], cursor, 'MATCH', pattern, 'COUNT', 256)
  cursor = r[1]
  for i = 1, #r[2], 2 do
    redis.call('ZREM', KEYS[2], r[2][i])
  end
until cursor == '0'
return 1
"#,
    )
});
