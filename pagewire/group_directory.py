"""The group directory in Redis: which scheduler drives which workers, for routers to find.

A scheduler drives one worker group and holds that group's lease. While it holds it, it
publishes the group's entry: its address (the ``schedulers`` hash, group -> address) and the ids
of the workers it drives (one set per group). The lease is the authority: the entry is written
only by a script that first checks the lease still holds the writer's token (a scheduler that lost
its lease cannot overwrite its successor's entry), and a reader counts a group as live only while
its lease key exists. So a standby that takes the lease over is found at its own address on the
next read, and a group whose scheduler is gone (lease lapsed) is never offered, whatever its stale
entry still says. The holder republishes every lease renewal, which also restores the entry after
Redis restarts empty.

Both sides live here so that the format has one home: the scheduler calls :func:`publish_group`,
routers :func:`read_live_groups`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pagewire.redis_client import Client
from pagewire.redis_keys import RedisKeys

# KEYS: the group's lease, the schedulers hash, the group's worker set.
# ARGV: the writer's lease token, the group, its address, then the worker ids.
_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('DEL', KEYS[3])
if #ARGV > 3 then redis.call('SADD', KEYS[3], unpack(ARGV, 4)) end
return 1
"""


@dataclass(frozen=True)
class Group:
    """A live worker group: its scheduler's address and the workers that scheduler drives."""

    name: str
    address: str
    workers: frozenset[str]


async def publish_group(
    r: Client, keys: RedisKeys, group: str, lease_token: str, address: str,
    worker_ids: Iterable[str],
) -> bool:
    """Write the group's entry if ``lease_token`` still holds its lease; False if it does not."""
    written = await r.eval(
        _PUBLISH, 3, keys.scheduler_lease(group), keys.schedulers(), keys.group_workers(group),
        lease_token, group, address, *sorted(worker_ids),
    )
    return bool(written)


async def read_live_groups(r: Client, keys: RedisKeys) -> list[Group]:
    """Every group whose lease is held, sorted by name (two round trips)."""
    entries = {g.decode(): a.decode() for g, a in (await r.hgetall(keys.schedulers())).items()}
    names = sorted(entries)
    if not names:
        return []
    async with r.pipeline(transaction=False) as p:
        for name in names:
            p.exists(keys.scheduler_lease(name))
            p.smembers(keys.group_workers(name))
        replies = await p.execute()
    return [
        Group(name, entries[name], frozenset(w.decode() for w in members))
        for name, held, members in zip(names, replies[0::2], replies[1::2], strict=True)
        if held
    ]
