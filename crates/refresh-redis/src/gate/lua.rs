//! The gate's server-side Lua scripts: each runs atomically on one hash slot, with time from Redis `TIME`.
//!
//! Times are UTC milliseconds. Redis 7 replicates script effects, so calling `TIME`
//! before writing is allowed and replicas never re-evaluate it. Replies are flat arrays
//! whose first element is a tag; `reply.rs` turns them into values.

use std::sync::LazyLock;

use WhenFull::{ReadsOnly, Refused, Runs};
use redis::Script;

/// Helpers every script starts with.
const PRELUDE: &str = r"
local DAY = 86400000
-- Integers as exact decimal strings (Lua numbers are doubles).
local function int(x) return string.format('%d', x) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The slot's epoch key (see epoch.rs) is gone: so is the gate's state on this slot.
local function lost(epoch) return redis.call('EXISTS', epoch) == 0 end
";

/// Quota helpers shared by the admission and status scripts.
const QUOTA: &str = r"
-- The local day [start, stop) holding `now`, found among the client's ascending
-- day boundaries A[first..]: Lua knows no time zones, Redis knows the time.
-- nil when Redis time lies outside them (a client clock off by days).
local function local_day(A, now, first)
  for j = first, #A - 1 do
    local start, stop = tonumber(A[j]), tonumber(A[j + 1])
    if start <= now and now < stop then return start, stop end
  end
end
-- Admissions `key` counts at `now` and, once they reach `limit`, when it admits again.
local function usage(key, limit, window, now, day_start, day_stop)
  if window == 'rolling_24h' then
    local since = '(' .. int(now - DAY)
    local used = redis.call('ZCOUNT', key, since, '+inf')
    if used < limit then return used end
    -- A place frees up when the (used - limit + 1)-th oldest counted admission ages out.
    local kth = redis.call('ZRANGE', key, since, '+inf', 'BYSCORE',
      'LIMIT', used - limit, 1, 'WITHSCORES')
    return used, tonumber(kth[2]) + DAY
  end
  local used = redis.call('ZCOUNT', key, int(day_start), '+inf')
  if used < limit then return used end
  return used, day_stop
end
";

/// Admission rules 1 and 2 on the consent's facts as mirrored in Redis (see
/// `Gate::mirror`), and rules 3 and 4 for one consent, as two steps: the check, and
/// (once every rule passed) the admission recorded.
const ADMIT_STEPS: &str = r"
-- The consent's facts, '<status> <expires at, ms> <tenant> <provider>' (F: their key),
-- first stored from `seed` when the caller looked them up in the database ('' if
-- not); kept FACTS_TTL ms (set by `facts_ttl`). `claimed`: the caller's tenant, '' for an operator.
-- The provider if rules 1 and 2 pass on them; else nil and {'lookup', now}: the
-- facts are missing or refuse, and the caller asks the database (the record).
local function consent_facts(F, claimed, seed, now)
  local facts = seed
  if seed ~= '' then
    redis.call('SET', F, seed, 'PX', FACTS_TTL)
  else
    facts = redis.call('GET', F)
    if not facts then return nil, {'lookup', now} end
  end
  local status, expires, tenant, provider = string.match(facts, '^(%S+) (%d+) (%S+) (%S+)$')
  if status ~= 'ACTIVE' or tonumber(expires) <= now or (claimed ~= '' and claimed ~= tenant) then
    return nil, {'lookup', now}
  end
  return provider
end
-- K[1]: the consent's lock; K[2..n+1]: the quota sets of the rules counting this
-- request (score = admission time, member = refresh id); K[n+2]: the slot's epoch.
-- A[1]: refresh id; A[2]: lease (ms); then limit and window of each quota set;
-- then the local-day boundaries if a calendar_day rule is among them.
-- Rules 3 and 4 at `now`: a refusal, or nil and the local day the rules count in.
local function admit_check(K, A, now)
  if lost(K[#K]) then return {'rebuild', now} end
  local holder = redis.call('GET', K[1])
  if holder then return {'locked', now, holder} end
  local n = #K - 2
  local day_start, day_stop = local_day(A, now, 3 + 2 * n)
  local refused = {'quota', now}
  for i = 1, n do
    local limit, window = tonumber(A[1 + 2 * i]), A[2 + 2 * i]
    if window ~= 'rolling_24h' and not day_start then return {'skew', now} end
    local used, at = usage(K[i + 1], limit, window, now, day_start, day_stop)
    if at then
      table.insert(refused, i - 1)
      table.insert(refused, used)
      table.insert(refused, at)
    end
  end
  if #refused > 2 then return refused end
  return nil, day_start, day_stop
end
-- Takes the lock for `lease` ms and counts the admission; the stamp of the state
-- that decided.
local function admit_record(K, A, now, day_start, day_stop, lease)
  redis.call('SET', K[1], A[1], 'PX', lease)
  for i = 1, #K - 2 do
    local key = K[i + 1]
    if A[2 + 2 * i] == 'rolling_24h' then
      redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now - DAY))
      redis.call('ZADD', key, int(now), A[1])
      redis.call('PEXPIREAT', key, int(now + DAY))
    else
      redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. int(day_start))
      redis.call('ZADD', key, int(now), A[1])
      redis.call('PEXPIREAT', key, int(day_stop))
    end
  end
  return redis.call('GET', K[#K])
end
";

/// Admission rules 3 and 4 for one consent, and if both pass, the admission
/// recorded: the consent's half of an admission on a cluster.
const ADMIT: &str = r"
-- KEYS[1]: the consent's facts; ARGV[1..2]: claimed tenant and seed of consent_facts.
-- KEYS[2..] and ARGV[3..]: K and A of admit_check.
local now = now_ms()
local provider, lookup = consent_facts(KEYS[1], ARGV[1], ARGV[2], now)
if not provider then return lookup end
local K, A = {unpack(KEYS, 2, #KEYS)}, {unpack(ARGV, 3, #ARGV)}
local refused, day_start, day_stop = admit_check(K, A, now)
if refused then return refused end
return {'ok', now, admit_record(K, A, now, day_start, day_stop, A[2]), provider}
";

/// Undoes [`ADMIT`]; idempotent, because everything it removes is keyed by the refresh id.
const RELEASE_ADMISSION: &str = r"
-- KEYS[1]: the lock; KEYS[2..]: the quota sets that counted the refresh. ARGV[1]: refresh id.
local released = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  released = 1
end
for i = 2, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return released
";

/// The admissions a consent's quota sets count that are at least an age old: the
/// candidates for healing an undo that never ran (see `Gate::counted_before`).
const COUNTED_BEFORE: &str = r"
-- KEYS: quota sets of one consent. ARGV[1]: age (ms). Members (refresh ids) scored
-- at or before now - age, each once.
local cutoff = now_ms() - tonumber(ARGV[1])
local seen, out = {}, {}
for i = 1, #KEYS do
  for _, member in ipairs(redis.call('ZRANGE', KEYS[i], '-inf', cutoff, 'BYSCORE')) do
    if not seen[member] then
      seen[member] = true
      table.insert(out, member)
    end
  end
end
return out
";

/// Admission rule 5 with the fair share of SPEC §6: the next start slot of a stagger
/// bucket for one class of request (on-demand, or auto-sync).
///
/// Each class follows its own chain: on-demand slots `spacing` apart (the limit's
/// rate), auto-sync slots `own` apart (the limit's rate times `stagger.autosync_share`),
/// so no period holds more auto-syncs than their share. Every slot of either class is
/// also kept at least `spacing` from every other slot of the bucket, so no period holds
/// more than the limit: a candidate that comes too near a slot of the other class
/// moves just past it. An on-demand request therefore starts about as early as if no
/// auto-sync were queued (it steps past at most the few auto-sync slots in its way),
/// while on-demand requests use less than the rest of the limit.
const TAKE_SLOT_STEP: &str = r"
-- K[1]: the class's last slot, as '<ms>:<refresh id>' (the owner makes giving it
-- back exact even when a later slot has the same time); K[2]: every slot of the
-- bucket not yet past (sorted set: member refresh id, score slot); K[3]: the slot's epoch.
-- A: the class's own spacing, max delay, period, the bucket's spacing (ms); refresh id.
local function take_slot(K, A, now)
  if lost(K[3]) then return {'rebuild', now} end
  local own, max_delay, period = tonumber(A[1]), tonumber(A[2]), tonumber(A[3])
  local spacing = tonumber(A[4])
  local raw = redis.call('GET', K[1])
  local last = raw and tonumber(string.match(raw, '^%d+'))
  local slot = now
  if last and last + own > now then slot = last + own end
  redis.call('ZREMRANGEBYSCORE', K[2], '-inf', '(' .. int(now - spacing))
  while slot - now <= max_delay do
    local near = redis.call('ZRANGEBYSCORE', K[2], '(' .. int(slot - spacing),
      '(' .. int(slot + spacing), 'WITHSCORES')
    if #near == 0 then break end
    slot = tonumber(near[#near]) + spacing
  end
  if slot - now > max_delay then return {'full', now, slot - now - max_delay} end
  -- Once `now` passes slot + spacing the value no longer matters; keep it a period.
  redis.call('SET', K[1], int(slot) .. ':' .. A[5], 'PXAT', int(slot + period))
  redis.call('ZADD', K[2], int(slot), A[5])
  local newest = redis.call('ZRANGE', K[2], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', K[2], int(tonumber(newest[2]) + period))
  return {'slot', now, slot, raw or ''}
end
";

/// [`TAKE_SLOT_STEP`] alone, for a cluster, where the bucket's slot may be on
/// another node than the consent's.
const TAKE_SLOT: &str = r"
-- KEYS and ARGV as K and A of take_slot.
return take_slot(KEYS, ARGV, now_ms())
";

/// Rules 3, 4 and 5 in one script, where every key is on one server (a single
/// Redis): lock and quota checked, then the start slot taken, and only then the
/// lock taken (for a lease past the start when that is more than half a lease away)
/// and the admission counted, so a refusal writes nothing to undo.
const ADMIT_WITH_SLOT: &str = r"
-- KEYS[1..3] and ARGV[1..5]: take_slot's K and A; KEYS[4], ARGV[6..7]: the consent's
-- facts, claimed tenant and seed of consent_facts; KEYS[5..] and ARGV[8..]:
-- admit_check's K and A. Replies as the admit script's, or take_slot's 'full',
-- or {'ok', now, epoch, slot, the class's last slot before it or '', provider}.
local admit_keys, admit_args = {unpack(KEYS, 5, #KEYS)}, {unpack(ARGV, 8, #ARGV)}
local now = now_ms()
local provider, lookup = consent_facts(KEYS[4], ARGV[6], ARGV[7], now)
if not provider then return lookup end
local refused, day_start, day_stop = admit_check(admit_keys, admit_args, now)
if refused then return refused end
local slot = take_slot(KEYS, ARGV, now)
if slot[1] ~= 'slot' then return slot end
-- A start further off than half a lease: the lock outlives the wait (a lease past it).
local lease, wait = tonumber(admit_args[2]), slot[3] - now
if wait > lease / 2 then lease = lease + wait end
local epoch = admit_record(admit_keys, admit_args, now, day_start, day_stop, int(lease))
return {'ok', now, epoch, slot[3], slot[4], provider}
";

/// Gives a slot back: it no longer keeps other slots away, and its chain moves back
/// if no later slot of the class was handed out since.
const RETURN_SLOT: &str = r"
-- KEYS[1]: the class's last slot; KEYS[2]: the bucket's slots. ARGV[1]: the value
-- the slot was stored as; ARGV[2]: the value before it, or ''; ARGV[3]: refresh id.
redis.call('ZREM', KEYS[2], ARGV[3])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
end
return 1
";

/// Extends the lock's lease if `ARGV[1]` still owns it. While the slot's state is
/// lost (and so every admission on it refused), the owner takes its lock back: the
/// rebuild would restore it from the `INITIALIZED` record anyway, and a running
/// refresh must not look abandoned meanwhile.
const RENEW_LOCK: &str = r"
-- KEYS[1]: the lock; KEYS[2]: the slot's epoch. ARGV[1]: refresh id; ARGV[2]: lease (ms).
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if holder or not lost(KEYS[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// The refresh holding a consent's lock; refuses while the slot's state is lost,
/// when a missing lock proves nothing.
const IN_FLIGHT: &str = r"
-- KEYS[1]: the lock; KEYS[2]: the slot's epoch.
if lost(KEYS[2]) then return {'rebuild'} end
local holder = redis.call('GET', KEYS[1])
if holder then return {'held', holder} end
return {'free'}
";

/// Deletes the lock if `ARGV[1]` still owns it.
const RELEASE_LOCK: &str = r"
-- KEYS[1]: the lock. ARGV[1]: refresh id.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
";

/// The quota status of one consent for one source; writes nothing.
const QUOTA_STATUS: &str = r"
-- KEYS[1..n]: the quota sets of the rules counting the source; KEYS[n+1]: the slot's epoch.
-- ARGV: limit and window of each; then the local-day boundaries if needed.
-- Reply: {'ok', now, used_1, at_1, ...} with at = -1 while the rule still admits.
local now = now_ms()
if lost(KEYS[#KEYS]) then return {'rebuild'} end
local n = #KEYS - 1
local day_start, day_stop = local_day(ARGV, now, 1 + 2 * n)
local reply = {'ok', now}
for i = 1, n do
  local limit, window = tonumber(ARGV[2 * i - 1]), ARGV[2 * i]
  if window ~= 'rolling_24h' and not day_start then return {'skew', now} end
  local used, at = usage(KEYS[i], limit, window, now, day_start, day_stop)
  table.insert(reply, used)
  table.insert(reply, at or -1)
end
return reply
";

/// The worker's start log: a sliding window of bank refresh starts per bucket.
const TAKE_START: &str = r"
-- KEYS[1]: the bucket's starts (score = start time, member = attempt id).
-- ARGV[1]: attempt id; ARGV[2]: limit; ARGV[3]: period (ms).
-- A start at s occupies [s, s + period]: in whole ms that is safe against the
-- sub-millisecond part TIME loses.
local now = now_ms()
local limit, period = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. int(now - period))
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {'go', now} end
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], int(now), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], int(period + 1))
  return {'go', now}
end
-- Free once the (count - limit + 1)-th oldest start leaves the window.
local kth = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
return {'wait', now, tonumber(kth[2]) + period + 1}
";

/// Rebuild: adds `score, member` pairs to a sorted set and makes it live at least
/// until a time, never shortening a longer life it already has.
const REBUILD_SET: &str = r"
-- KEYS[1]: the sorted set. ARGV[1]: expire at (ms); ARGV[2..]: score, member pairs.
for i = 2, #ARGV - 1, 2 do redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1]) end
local at = tonumber(ARGV[1])
if redis.call('PEXPIRETIME', KEYS[1]) < at then redis.call('PEXPIREAT', KEYS[1], ARGV[1]) end
return 1
";

/// Rebuild, last: each epoch key gets the rebuild's stamp unless it holds a later one
/// (two rebuilds that overlap, one of them slower, leave the later stamp).
const REBUILD_EPOCHS: &str = r"
-- KEYS: epoch keys. ARGV[1]: the rebuild's stamp (ms).
local stamp = tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
  local held = tonumber(redis.call('GET', key) or '')
  if not held or held < stamp then redis.call('SET', key, ARGV[1]) end
end
return 1
";

/// Rebuild: a class's last slot, unless a later one is already stored.
const REBUILD_CHAIN: &str = r"
-- KEYS[1]: the class's last slot. ARGV[1]: slot (ms); ARGV[2]: refresh id; ARGV[3]: period (ms).
local raw = redis.call('GET', KEYS[1])
local last = raw and tonumber(string.match(raw, '^%d+'))
local slot = tonumber(ARGV[1])
if last and last >= slot then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'PXAT', string.format('%d', slot + tonumber(ARGV[3])))
return 1
";

/// Rebuild: a lock, unless one is held.
const REBUILD_LOCK: &str = r"
-- KEYS[1]: the lock. ARGV[1]: refresh id; ARGV[2]: lease (ms).
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
";

/// What a script may do while Redis is full (`used_memory` past `maxmemory` under
/// the `noeviction` policy that OPERATIONS.md asks for), declared in its shebang
/// line so that Redis decides before the script runs, never halfway through it.
#[derive(Clone, Copy)]
enum WhenFull {
    /// It adds state (an admission, a start slot, a rebuild): refused whole, with
    /// Redis's `OOM` error, so the caller answers 503 and nothing is consumed. A
    /// script without a shebang would instead be refused only at its first write
    /// command that Redis denies when full, and the admission scripts' first write
    /// (a `ZREMRANGEBYSCORE`) is not one: they would admit into a full Redis.
    Refused,
    /// It keeps what runs going (a lease renewed, a bank start of a refresh already
    /// admitted) or frees state (an undo, a release): it runs anyway.
    Runs,
    /// It writes nothing: it runs anyway (and on a replica).
    ReadsOnly,
}

/// How long a consent's mirrored facts live unless written again: a consent not
/// asked about for a week is looked up again.
pub(super) const FACTS_TTL_MS: i64 = 604_800_000;

/// [`FACTS_TTL_MS`] for the admit scripts, so that they and `Gate::mirror` keep
/// facts equally long.
fn facts_ttl() -> String {
    format!("\nlocal FACTS_TTL = {FACTS_TTL_MS}\n")
}

fn script(when_full: WhenFull, parts: &[&str]) -> Script {
    let shebang = match when_full {
        Refused => "#!lua\n",
        Runs => "#!lua flags=allow-oom\n",
        ReadsOnly => "#!lua flags=no-writes\n",
    };
    let mut code = String::from(shebang);
    code.push_str(&parts.concat());
    Script::new(&code)
}

pub(super) static ADMIT_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(Refused, &[PRELUDE, &facts_ttl(), QUOTA, ADMIT_STEPS, ADMIT]));
pub(super) static RELEASE_ADMISSION_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(Runs, &[RELEASE_ADMISSION]));
pub(super) static COUNTED_BEFORE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(ReadsOnly, &[PRELUDE, COUNTED_BEFORE]));
pub(super) static TAKE_SLOT_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(Refused, &[PRELUDE, TAKE_SLOT_STEP, TAKE_SLOT]));
pub(super) static ADMIT_WITH_SLOT_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    script(
        Refused,
        &[
            PRELUDE,
            &facts_ttl(),
            QUOTA,
            ADMIT_STEPS,
            TAKE_SLOT_STEP,
            ADMIT_WITH_SLOT,
        ],
    )
});
pub(super) static RETURN_SLOT_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(Runs, &[RETURN_SLOT]));
pub(super) static RENEW_LOCK_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(Runs, &[PRELUDE, RENEW_LOCK]));
pub(super) static IN_FLIGHT_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(ReadsOnly, &[PRELUDE, IN_FLIGHT]));
pub(super) static REBUILD_SET_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(Refused, &[REBUILD_SET]));
pub(super) static REBUILD_LOCK_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(Refused, &[REBUILD_LOCK]));
pub(super) static REBUILD_EPOCHS_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(Refused, &[REBUILD_EPOCHS]));
pub(super) static REBUILD_CHAIN_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(Refused, &[REBUILD_CHAIN]));
pub(super) static RELEASE_LOCK_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(Runs, &[RELEASE_LOCK]));
pub(super) static QUOTA_STATUS_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(ReadsOnly, &[PRELUDE, QUOTA, QUOTA_STATUS]));
pub(super) static TAKE_START_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(Runs, &[PRELUDE, TAKE_START]));
