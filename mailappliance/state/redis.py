"""The state store in Redis, shared by several appliances.

Every operation is one Lua script (EVALSHA) or one command, so it is atomic
on the server: two hosts never read, change and write back the same value.

Keys: ``<key_prefix><kind>:<hash>``, where ``<hash>`` is the SHA-256 of the
key's values, each preceded by its length, so values that come from clients
(logins, addresses) can neither collide with each other nor reach another
kind's keys, and a key never grows with the input.  Windows are a sorted set
(member ``<token>/<amount>``, score the time) plus its running total
(``<key>:t``); every key expires on its own once nobody uses it.  Times
come from the callers' clocks (see :mod:`mailappliance.state`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from itertools import count as counter
from typing import cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from mailappliance.state import Key, MarkRule, Token
from mailappliance.state.resp import RedisClient, Reply, Script

FENCE_LIFETIME_MS = 7 * 86400 * 1000  # a lock's fencing counter outlives any lock on it

_TRIM = """
local function trim(z, t, edge)
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', edge)
  if #old > 0 then
    local gone = 0
    for i = 1, #old do gone = gone + tonumber(string.match(old[i], '/(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', edge)
    if redis.call('EXISTS', z) == 0 then redis.call('DEL', t) return 0 end
    return redis.call('DECRBY', t, gone)
  end
  if redis.call('EXISTS', z) == 0 then redis.call('DEL', t) return 0 end
  return tonumber(redis.call('GET', t) or '0')
end
local function keep_alive(z, t, span)
  local ms = math.ceil(span * 1000) + 1000
  redis.call('PEXPIRE', z, ms)
  redis.call('PEXPIRE', t, ms)
end
"""

# KEYS: window, total; ARGV: now, span, limit ('' = none), amount, member
RESERVE: Script[int] = Script(_TRIM + """
local now, span, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
local total = trim(KEYS[1], KEYS[2], now - span)
if ARGV[3] ~= '' and total + amount > tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('INCRBY', KEYS[2], amount)
keep_alive(KEYS[1], KEYS[2], span)
return 1
""")

# KEYS: window, total; ARGV: member
RELEASE: Script[int] = Script("""
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('DECRBY', KEYS[2], tonumber(string.match(ARGV[1], '/(%d+)$')))
  if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end
end
return 1
""")

# KEYS: window, total; ARGV: now, span
TOTAL: Script[int] = Script(_TRIM + """
return trim(KEYS[1], KEYS[2], tonumber(ARGV[1]) - tonumber(ARGV[2]))
""")

# KEYS: window, total, mark ('' unused); ARGV: now, span, keep, member, threshold, mark value, mark ms
COUNT: Script[int] = Script(_TRIM + """
local now, span, keep = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
trim(KEYS[1], KEYS[2], now - span)
redis.call('ZADD', KEYS[1], now, ARGV[4])
local found = redis.call('INCRBY', KEYS[2], 1)
local extra = redis.call('ZCARD', KEYS[1]) - keep
if extra > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1)
  found = redis.call('DECRBY', KEYS[2], extra)
end
keep_alive(KEYS[1], KEYS[2], span)
local threshold = tonumber(ARGV[5])
if threshold > 0 and found >= threshold then
  redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[7])
end
return found
""")

_HOLDER = """
local function holder(key, now)
  local value = redis.call('GET', key)
  if not value then return nil end
  local bar = string.find(value, '|', 1, true)
  if tonumber(string.sub(value, bar + 1)) <= now then return nil end
  return string.sub(value, 1, bar - 1)
end
"""

# KEYS: lock, fence; ARGV: owner, now, until, ms
LOCK: Script[int | None] = Script(_HOLDER + f"""
local current = holder(KEYS[1], tonumber(ARGV[2]))
if current and current ~= ARGV[1] then return false end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[3], 'PX', ARGV[4])
local fence = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], {FENCE_LIFETIME_MS})
return fence
""")

# KEYS: lock; ARGV: owner, now, until, ms
REFRESH: Script[int] = Script(_HOLDER + """
local current = holder(KEYS[1], tonumber(ARGV[2]))
if current and current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[3], 'PX', ARGV[4])
return 1
""")

# KEYS: lock; ARGV: owner, now
HOLDS: Script[int] = Script(_HOLDER + """
if holder(KEYS[1], tonumber(ARGV[2])) == ARGV[1] then return 1 end
return 0
""")

# KEYS: lock; ARGV: owner, now
UNLOCK: Script[int] = Script(_HOLDER + """
if holder(KEYS[1], tonumber(ARGV[2])) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
""")

# KEYS: value; ARGV: now
GET_VALUE: Script[int | None] = Script("""
local value = redis.call('GET', KEYS[1])
if not value then return false end
local bar = string.find(value, '|', 1, true)
if tonumber(string.sub(value, bar + 1)) <= tonumber(ARGV[1]) then return false end
return tonumber(string.sub(value, 1, bar - 1))
""")

# KEYS: value; ARGV: amount
ADD_VALUE: Script[int] = Script("""
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
local bar = string.find(value, '|', 1, true)
local ms = redis.call('PTTL', KEYS[1])
if ms <= 0 then return 0 end
local sum = string.format('%d', tonumber(string.sub(value, 1, bar - 1)) + tonumber(ARGV[1]))
redis.call('SET', KEYS[1], sum .. string.sub(value, bar), 'PX', ms)
return 1
""")


def encode_key(prefix: str, key: Key) -> str:
    """``<prefix><kind>:<sha256 of the length-prefixed values>`` (see the module docstring)."""
    kind, values = key[0], key[1:]
    digest = hashlib.sha256()
    for value in values:
        data = value.encode("utf-8", "surrogateescape")
        digest.update(b"%d:" % len(data))
        digest.update(data)
    return f"{prefix}{kind}:{digest.hexdigest()}"


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _number(value: float) -> str:
    return repr(float(value))


def _nothing(_: object) -> None:
    return None


class RedisStore:
    """:class:`~mailappliance.state.StateStore` in Redis (see the module docstring)."""

    shared = True

    def __init__(self, client: RedisClient, clock: IReactorTime, prefix: str = "mailappliance:") -> None:
        self.client = client
        self.clock = clock
        self.prefix = prefix
        self._tokens = counter()
        self._token_base = os.urandom(6).hex()

    def describe(self) -> str:
        return "ok"

    def key(self, key: Key) -> str:
        return encode_key(self.prefix, key)

    def _token(self) -> str:
        return f"{self._token_base}{next(self._tokens):x}"

    def ping(self) -> Deferred[Reply]:
        return self.client.execute("PING")

    def close(self) -> None:
        self.client.close()

    # -- windows --------------------------------------------------------------------

    def reserve(self, key: Key, span: float, limit: float, amount: int = 1) -> Deferred[str | None]:
        """The token is the window's member: ``<token>/<amount>``."""
        window = self.key(key)
        member = f"{self._token()}/{int(amount)}"
        limit_text = "" if math.isinf(limit) else str(int(limit))
        d = self.client.evaluate(RESERVE, (window, window + ":t"),
                                 (_number(self.clock.seconds()), _number(span), limit_text, int(amount), member))
        return d.addCallback(lambda granted: member if granted == 1 else None)

    def release(self, key: Key, token: Token) -> Deferred[None]:
        if not isinstance(token, str):  # not one of ours: nothing to give back
            return succeed(None)
        window = self.key(key)
        return self.client.evaluate(RELEASE, (window, window + ":t"), (token,)).addCallback(_nothing)

    def total(self, key: Key, span: float) -> Deferred[int]:
        window = self.key(key)
        return self.client.evaluate(TOTAL, (window, window + ":t"), (_number(self.clock.seconds()), _number(span)))

    def count(self, key: Key, span: float, keep: int, mark: MarkRule | None = None) -> Deferred[int]:
        window = self.key(key)
        now = self.clock.seconds()
        mark_key, threshold, value, ms = window + ":m", 0, "", 1
        if mark is not None:
            mark_key, threshold, value, ms = self.key(mark.key), mark.threshold, _number(now + mark.ttl), _ms(mark.ttl)
        return self.client.evaluate(COUNT, (window, window + ":t", mark_key),
                                    (_number(now), _number(span), int(keep), f"{self._token()}/1",
                                     threshold, value, ms))

    def forget(self, key: Key) -> Deferred[None]:
        window = self.key(key)
        return self.client.execute("DEL", window, window + ":t").addCallback(_nothing)

    # -- marks ----------------------------------------------------------------------

    def mark(self, key: Key, ttl: float) -> Deferred[None]:
        d = self.client.execute("SET", self.key(key), _number(self.clock.seconds() + ttl), "PX", _ms(ttl))
        return d.addCallback(_nothing)

    def marks(self, keys: Sequence[Key]) -> Deferred[list[float]]:
        d = self.client.execute("MGET", *(self.key(key) for key in keys))
        now = self.clock.seconds()

        def left(reply: Reply) -> list[float]:
            values = cast(list[bytes | None], reply)  # MGET: an array of bulk strings or nil
            return [max(0.0, float(value) - now) if value else 0.0 for value in values]

        return d.addCallback(left)

    # -- locks ----------------------------------------------------------------------

    def _lock_args(self, owner: str, ttl: float) -> tuple[str, str, str, int]:
        now = self.clock.seconds()
        return owner, _number(now), _number(now + ttl), _ms(ttl)

    def lock(self, key: Key, owner: str, ttl: float) -> Deferred[int | None]:
        name = self.key(key)
        return self.client.evaluate(LOCK, (name, name + ":f"), self._lock_args(owner, ttl))

    def refresh(self, key: Key, owner: str, ttl: float) -> Deferred[bool]:
        d = self.client.evaluate(REFRESH, (self.key(key),), self._lock_args(owner, ttl))
        return d.addCallback(lambda ours: ours == 1)

    def holds(self, key: Key, owner: str) -> Deferred[bool]:
        d = self.client.evaluate(HOLDS, (self.key(key),), (owner, _number(self.clock.seconds())))
        return d.addCallback(lambda ours: ours == 1)

    def unlock(self, key: Key, owner: str) -> Deferred[None]:
        d = self.client.evaluate(UNLOCK, (self.key(key),), (owner, _number(self.clock.seconds())))
        return d.addCallback(_nothing)

    # -- cached numbers -----------------------------------------------------------------

    def get_value(self, key: Key) -> Deferred[int | None]:
        return self.client.evaluate(GET_VALUE, (self.key(key),), (_number(self.clock.seconds()),))

    def set_value(self, key: Key, value: int, ttl: float) -> Deferred[None]:
        text = f"{int(value)}|{_number(self.clock.seconds() + ttl)}"
        return self.client.execute("SET", self.key(key), text, "PX", _ms(ttl)).addCallback(_nothing)

    def add_value(self, key: Key, amount: int) -> Deferred[None]:
        return self.client.evaluate(ADD_VALUE, (self.key(key),), (int(amount),)).addCallback(_nothing)
