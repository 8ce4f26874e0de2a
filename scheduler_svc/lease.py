"""One scheduler per worker group: a lease in Redis.

Two schedulers driving the same workers would both allocate their KV blocks. During a rolling
update, or with a standby replica, the second scheduler waits for the lease; the holder renews
it every third of its TTL and exits the moment a renewal fails (another scheduler may already
be recovering the group from Redis, so continuing would corrupt the state of record).
"""

from __future__ import annotations

import asyncio
import uuid

from pagewire.redis_client import STORE_DOWN, Client

# Compare-and-act on the token, so a holder can never renew or drop a lease it no longer owns.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseLost(Exception):
    pass


class Lease:
    def __init__(self, r: Client, key: str, ttl_s: float) -> None:
        self.r = r
        self.key = key
        self.ttl_ms = max(int(ttl_s * 1000), 100)
        self.token = uuid.uuid4().hex

    async def acquire(self, on_wait: asyncio.Event | None = None) -> None:
        """Block until this process holds the lease."""
        while not await self.r.set(self.key, self.token, nx=True, px=self.ttl_ms):
            if on_wait is not None:
                on_wait.set()
            await asyncio.sleep(self.ttl_ms / 3000)

    async def keep(self) -> None:
        """Renew until cancelled; raise LeaseLost if someone else holds the lease.

        Through a Redis outage the holder keeps going (nobody else can take the lease while
        Redis is down); a restarted, empty Redis has no lease at all, and the holder takes it
        back unless another scheduler was quicker.
        """
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                renewed = await self.r.eval(_RENEW, 1, self.key, self.token, self.ttl_ms)
                if not renewed and not await self.r.set(self.key, self.token, nx=True, px=self.ttl_ms):
                    raise LeaseLost(self.key)
            except STORE_DOWN:
                continue

    async def release(self) -> None:
        await self.r.eval(_RELEASE, 1, self.key, self.token)
