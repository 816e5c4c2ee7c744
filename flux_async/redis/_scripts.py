"""The Lua scripts `RedisRateLimiter` runs on the Redis server, and how they are called.

Every time in here is the Redis server's (``TIME``), so clients whose clocks disagree
share one schedule: a script answers with *durations* ("your slot is 0.012 s from now",
"paused for 0.8 s more") and each process adds them to its own event loop's clock.

The state of one limiter is one hash and, with ``max_in_flight``, one sorted set; both
keys carry the same ``{hash tag}``, so in a Redis Cluster they live in one slot and each
script touches one node. Hash fields:

    epoch    when the hash was created (server time): a new epoch (Redis restarted or
             flushed, or the key expired) tells every process to forget what it counted
    tat      GCRA's theoretical arrival time of the next permit
    last     the latest slot booked (a cut starts one new interval after it)
    pause    the pause gate: nobody gets a permit before this time
    rate     the shared rate (req/s; "0" for unpaced); absent: the ceiling (or unpaced)
    ver      bumped on every rate change, so a late answer cannot undo a newer rate
    cuts     cuts applied; cut_at / grow_at: when the last cut / growth step was applied
    g s l    permits granted, successes and 429s reported, by every process together;
             l_at: when the latest 429 was reported

Numbers that are not whole go back and forth as strings formatted with ``%.17g`` (a Lua
number handed to Redis or returned from a script loses its fraction or digits otherwise);
durations come back as whole microseconds, rounded up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import attrs
import redis.exceptions

__all__ = ["ACQUIRE", "FEEDBACK", "RENEW", "Script", "as_text", "float_arg"]

# Shared by every script: the server's clock, the hash's epoch, the rate in force.
_PRELUDE = """
local SLACK = 1e-6
local function fmt(x) return string.format('%.17g', x) end
local function us(x) if x < 0 then x = 0 end return math.ceil(x * 1000000) end
local NEVER_US = -4503599627370496
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function rate_in_force(stored, ceiling)
  local rate = tonumber(stored)
  if rate == nil then rate = ceiling end
  if ceiling > 0 and (rate <= 0 or rate > ceiling) then rate = ceiling end
  return rate
end
-- Count the caller's successes and 429s; the reply header every script starts with:
-- {epoch, rate, pause (us from now, negative once past; NEVER_US if never shut),
--  g, s, l (totals of all processes), age of the latest 429 (us), ver, cuts, granted}
local function counted(f, successes, limited)
  local s = (tonumber(f.s) or 0) + tonumber(successes)
  local l = (tonumber(f.l) or 0) + tonumber(limited)
  local l_at = tonumber(f.l_at) or 0
  if tonumber(limited) > 0 then l_at = now end
  return s, l, l_at
end
local function header(epoch, rate, pause, g, s, l, l_at, ver, cuts, granted)
  local p = NEVER_US
  if pause > 0 then p = math.floor((pause - now) * 1000000) end
  local age = NEVER_US
  if l_at > 0 then age = us(now - l_at) end
  return {epoch, fmt(rate), p, g, s, l, age, ver, cuts, granted}
end
"""

# KEYS[1] state hash, KEYS[2] leases sorted set
# ARGV[1] ceiling (req/s, 0 = none)   ARGV[2] burst        ARGV[3] horizon (s)
# ARGV[4] permits wanted              ARGV[5] key ttl (ms) ARGV[6] max_in_flight (0 = none)
# ARGV[7] lease (s)                   ARGV[8] successes to count   ARGV[9] 429s to count
# ARGV[10] k, then k lease ids to release, then one lease id per permit wanted
# -> header (see the prelude), then {status, retry_us, wait_us...}
#    status: ok | paused | beyond (the next slot lies past the horizon) | full (no lease)
_ACQUIRE = (
    _PRELUDE
    + """
local f = redis.call('HMGET', KEYS[1], 'epoch', 'tat', 'pause', 'rate', 'g', 's', 'l',
                     'ver', 'cuts', 'l_at')
local epoch = f[1]
if not epoch then
  epoch = t[1] .. '.' .. t[2]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local ceiling = tonumber(ARGV[1])
local rate = rate_in_force(f[4], ceiling)
local pause = tonumber(f[3]) or 0
local g = tonumber(f[5]) or 0
local s, l, l_at = counted({s = f[6], l = f[7], l_at = f[10]}, ARGV[8], ARGV[9])
local ttl = ARGV[5]
local nrel = tonumber(ARGV[10])
if nrel > 0 then
  redis.call('ZREM', KEYS[2], unpack(ARGV, 11, 10 + nrel))
end
local want = tonumber(ARGV[4])
local maxf = tonumber(ARGV[6])
local status = 'ok'
local retry = 0
local waits = {}
local n = 0
if pause - now > SLACK then
  status = 'paused'
  retry = pause - now
  want = 0
end
if want > 0 and maxf > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local free = maxf - redis.call('ZCARD', KEYS[2])
  if free <= 0 then
    status = 'full'
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    retry = tonumber(first[2]) - now
    want = 0
  elseif free < want then
    want = free
  end
end
if want > 0 then
  if rate <= 0 then
    for i = 1, want do waits[i] = 0 end
    n = want
  else
    local T = 1 / rate
    local tau = (tonumber(ARGV[2]) - 1) * T
    local tat = tonumber(f[2])
    if tat == nil then tat = now + tau elseif tat < now then tat = now end
    local horizon = tonumber(ARGV[3])
    local last = nil
    for i = 1, want do
      local slot = tat - tau
      if slot < now then
        slot = now
      elseif slot - now > horizon + SLACK then
        break
      end
      n = n + 1
      waits[n] = us(slot - now)
      last = slot
      tat = tat + T
    end
    if n < want then retry = tat - tau - horizon - now end
    if n == 0 then
      status = 'beyond'
    else
      redis.call('HSET', KEYS[1], 'tat', fmt(tat), 'last', fmt(last))
    end
  end
  if n > 0 and maxf > 0 then
    local expiry = now + tonumber(ARGV[7])
    local base = 10 + nrel
    for i = 1, n do redis.call('ZADD', KEYS[2], fmt(expiry), ARGV[base + i]) end
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
  g = g + n
end
redis.call('HSET', KEYS[1], 'g', g, 's', s, 'l', l, 'l_at', fmt(l_at))
redis.call('PEXPIRE', KEYS[1], ttl)
local reply = header(epoch, rate, pause, g, s, l, l_at, tonumber(f[8]) or 0,
                     tonumber(f[9]) or 0, n)
reply[#reply + 1] = status
reply[#reply + 1] = us(retry)
for i = 1, n do reply[#reply + 1] = waits[i] end
return reply
"""
)

# KEYS[1] state hash
# ARGV[1] ceiling   ARGV[2] burst   ARGV[3] window (s)   ARGV[4] key ttl (ms)
# ARGV[5] '' | 'cut' | 'grow'       ARGV[6] the rate proposed (req/s, 0 = unpaced)
# ARGV[7] pause for (s, 0 = none)      ARGV[8] successes to count   ARGV[9] 429s to count
# -> header (see the prelude), then {applied (1 when the rate proposal was applied)}
#
# A cut is applied at most once per window across all processes, and never raises the
# rate (min of the shared and the proposed rate); a growth step at most once per window
# after the last change, and never lowers it. Every process runs the same controller on
# the same events, so the first proposal of a window stands for all of them.
_FEEDBACK = (
    _PRELUDE
    + """
local f = redis.call('HMGET', KEYS[1], 'epoch', 'tat', 'pause', 'rate', 'ver', 'cuts',
                     'cut_at', 'grow_at', 'last', 'g', 's', 'l', 'l_at')
local epoch = f[1]
if not epoch then
  epoch = t[1] .. '.' .. t[2]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local ceiling = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local rate = rate_in_force(f[4], ceiling)
local pause = tonumber(f[3]) or 0
local ver = tonumber(f[5]) or 0
local cuts = tonumber(f[6]) or 0
local cut_at = tonumber(f[7]) or 0
local grow_at = tonumber(f[8]) or 0
local op = ARGV[5]
local proposed = tonumber(ARGV[6])
local applied = 0
local tat = tonumber(f[2])
if op == 'cut' and proposed > 0 and now - cut_at + SLACK >= window then
  local new = proposed
  if rate > 0 and rate < new then new = rate end
  if ceiling > 0 and new > ceiling then new = ceiling end
  local last = tonumber(f[9])
  if last then
    -- The next permit goes a full new interval after the last one booked, with no
    -- burst credit (the in-process Pacer.set_rate(cut=True) does the same).
    local T = 1 / new
    local floor = last + T + (burst - 1) * T
    if tat == nil or tat < floor then tat = floor end
  end
  rate = new
  cuts = cuts + 1
  ver = ver + 1
  applied = 1
  redis.call('HSET', KEYS[1], 'rate', fmt(rate), 'cut_at', fmt(now), 'cuts', cuts,
             'ver', ver)
elseif op == 'grow' then
  local bigger = (proposed <= 0 and rate > 0) or (rate > 0 and proposed > rate)
  if ceiling > 0 and proposed <= 0 then proposed = ceiling end
  if ceiling > 0 and proposed > ceiling then proposed = ceiling end
  local since = cut_at
  if grow_at > since then since = grow_at end
  if bigger and proposed ~= rate and now - since + SLACK >= window then
    rate = proposed
    ver = ver + 1
    applied = 1
    redis.call('HSET', KEYS[1], 'rate', fmt(rate), 'grow_at', fmt(now), 'ver', ver)
  end
end
local pause_for = tonumber(ARGV[7])
if pause_for > 0 and now + pause_for > pause then
  pause = now + pause_for
  redis.call('HSET', KEYS[1], 'pause', fmt(pause))
end
if pause > now and rate > 0 then
  -- The gate releases at the paced rate, with no burst credit (Pacer.hold_until).
  local floor = pause + (burst - 1) / rate
  if tat == nil or tat < floor then tat = floor end
end
if tat ~= nil and tat ~= tonumber(f[2]) then
  redis.call('HSET', KEYS[1], 'tat', fmt(tat))
end
local s, l, l_at = counted({s = f[11], l = f[12], l_at = f[13]}, ARGV[8], ARGV[9])
redis.call('HSET', KEYS[1], 's', s, 'l', l, 'l_at', fmt(l_at))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local reply = header(epoch, rate, pause, tonumber(f[10]) or 0, s, l, l_at, ver, cuts, 0)
reply[#reply + 1] = applied
return reply
"""
)

# KEYS[1] leases sorted set
# ARGV[1] lease (s)   ARGV[2] key ttl (ms)   ARGV[3..] lease ids still held
# -> the number of leases renewed (one that already expired is not brought back)
_RENEW = (
    _PRELUDE
    + """
local expiry = now + tonumber(ARGV[1])
local renewed = 0
for i = 3, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', fmt(expiry), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return renewed
"""
)


@attrs.frozen
class Script:
    """One Lua script: run with EVALSHA, loaded again when the server answers NOSCRIPT
    (after ``SCRIPT FLUSH``, a restart or a failover).

    Example::

        reply = await ACQUIRE.run(client, [state_key, leases_key], args)
    """

    name: str
    source: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    async def run(self, client: Any, keys: Sequence[str], args: Sequence[object]) -> Any:
        """EVALSHA; on NOSCRIPT, SCRIPT LOAD and EVALSHA once more."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


def float_arg(value: float) -> str:
    """``value`` as a script argument: the float's ``repr``, which ``tonumber`` reads back
    exactly.

    Example::

        float_arg(0.25)   # '0.25'
        float_arg(10)     # '10.0'
    """
    return repr(float(value))


def as_text(value: object) -> str:
    """A string from a script's answer (redis-py gives bytes unless it decodes).

    Example::

        as_text(b"ok")   # 'ok'
    """
    return value.decode() if isinstance(value, bytes) else str(value)


ACQUIRE = Script("acquire", _ACQUIRE)
FEEDBACK = Script("feedback", _FEEDBACK)
RENEW = Script("renew", _RENEW)
