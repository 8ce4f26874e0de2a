"""One scheduler per worker group: a lease in Redis.

Two schedulers driving the same workers would both allocate their KV blocks. During a rolling
update, or with a standby replica, the second scheduler waits for the lease; the holder renews
it every third of its TTL and exits the moment a renewal fails (another scheduler may already
be recovering the group from Redis, so continuing would corrupt the state of record).

A holder that dies without releasing (SIGKILL, a crash) leaves its lease for up to one TTL, and
its group's streams stall that long. A successor on the *same machine* need not wait: the lease's
value names its holder (a random token, then host name, boot id and pid namespace, then pid), so
a successor that finds it held by a process of its own process space that no longer exists
takes it over at once,
with a compare-and-set on that exact value (a holder that renewed meanwhile keeps it). On
another machine nothing can prove the holder dead, and the successor waits for the TTL -- as
does one that finds the old pid alive (whatever process has it now).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from pathlib import Path

from pagewire.redis_client import Client
from pagewire.store_outage import STORE_DOWN

# Compare-and-act on the token, so a holder can never renew or drop a lease it no longer owns.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Take the lease of a holder known to be dead: only if it still holds exactly that value.
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


log = logging.getLogger("scheduler.lease")


class LeaseLost(Exception):
    pass


def _process_space() -> str:
    """Where a pid means one process: this boot of this machine, this pid namespace (containers
    on one host share the boot, not the pids). Empty when unknown: then no holder is ever
    proven dead."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid").replace(" ", "")
    except OSError:
        return ""
    return f"{socket.gethostname()}/{boot}/{namespace}".replace(" ", "")


def holder_value() -> str:
    """This process's lease value: a fresh token, then where its pid lives, then its pid."""
    return f"{uuid.uuid4().hex} {_process_space() or '-'} {os.getpid()}"


def holder_is_dead(value: bytes | str) -> bool:
    """Whether the lease holder named by ``value`` is a process of this very process space (see
    :func:`_process_space`) that no longer exists. False whenever that cannot be proven."""
    text = value.decode() if isinstance(value, bytes) else value
    parts = text.split(" ")
    if len(parts) != 3 or not parts[2].isdigit():
        return False
    _, space, pid = parts
    if space in ("", "-") or space != _process_space() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, not ours to signal
        return False
    return False


class Lease:
    def __init__(self, r: Client, key: str, ttl_s: float) -> None:
        self.r = r
        self.key = key
        self.ttl_ms = max(int(ttl_s * 1000), 100)
        self.token = holder_value()

    async def acquire(self, on_wait: asyncio.Event | None = None) -> None:
        """Block until this process holds the lease: at once when it is free or its holder is
        proven dead, else when the holder's TTL runs out (polled at least every third of it)."""
        while not await self._try_take():
            if on_wait is not None:
                on_wait.set()
            left_ms = await self.r.pttl(self.key)
            await asyncio.sleep(min(max(left_ms, 10), self.ttl_ms / 3) / 1000)

    async def _try_take(self) -> bool:
        if await self.r.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return True
        held = await self.r.get(self.key)
        if held is None or not holder_is_dead(held):
            return False
        taken = await self.r.eval(_TAKE_OVER, 1, self.key, held, self.token, self.ttl_ms)
        if taken:
            log.warning("took over lease %s from a holder that is gone (%s)", self.key,
                        held.decode(errors="replace").split(" ", 1)[1])
        return bool(taken)

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
