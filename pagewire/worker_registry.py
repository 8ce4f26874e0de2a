"""The worker registry in Redis: which workers exist, where they listen, and whether they beat.

A worker with ``--redis-url`` writes, at every heartbeat, in one transaction: its id into the
``workers`` set, its :class:`WorkerEntry` into its info hash (no TTL: gone only with Redis), and
its heartbeat key with a TTL of three beats (gone = the worker stopped). Schedulers read it to
find the workers of their group (:func:`live_addresses`), routers to learn every worker's block
size and pool (:func:`read_entries`), and the scheduler's heartbeat watch reads the keys
themselves (``scheduler_svc.heartbeat``).

Both sides live here so that the format has one home, as ``group_directory`` does for groups.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pagewire.redis_client import Client
from pagewire.redis_keys import RedisKeys

DEFAULT_GROUP = "default"  # the group of a worker registered without one (before groups existed)


@dataclass(frozen=True)
class WorkerEntry:
    """One worker's info hash. Readers tolerate missing fields: an entry written by an older
    worker (no ``group``) or by hand in a test reads with the defaults."""

    worker_id: str
    address: str = ""
    model: str = ""
    block_size: int = 0
    num_blocks: int = 0
    max_model_len: int = 0
    group: str = DEFAULT_GROUP
    pid: int = 0

    def fields(self) -> dict[str, str | int]:
        """The hash as written (the id is the key's, not a field)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "worker_id"}

    @classmethod
    def from_fields(cls, worker_id: str, raw: dict[bytes, bytes]) -> WorkerEntry:
        values: dict[str, str | int] = {}
        for f in dataclasses.fields(cls):
            value = raw.get(f.name.encode())
            if value:
                values[f.name] = int(value) if f.type == "int" else value.decode()
        return cls(worker_id, **values)  # type: ignore[arg-type]


async def beat(r: Client, keys: RedisKeys, entry: WorkerEntry, ttl_ms: int) -> None:
    """One heartbeat: register (again) and refresh the key whose TTL says the worker is alive."""
    async with r.pipeline(transaction=True) as p:
        p.sadd(keys.workers(), entry.worker_id)
        p.hset(keys.worker_info(entry.worker_id), mapping=entry.fields())
        p.set(keys.worker_alive(entry.worker_id), entry.address, px=ttl_ms)
        await p.execute()


async def leave(r: Client, keys: RedisKeys, worker_id: str) -> None:
    """A worker exiting drops its heartbeat key, not its entry: a key gone before its TTL beside
    an entry still there is how the scheduler tells a worker that left from a Redis restart."""
    await r.delete(keys.worker_alive(worker_id))


async def read_entries(r: Client, keys: RedisKeys) -> list[WorkerEntry]:
    """Every registered worker's entry, sorted by id (two round trips), alive or not."""
    ids = sorted(m.decode() for m in await r.smembers(keys.workers()))
    if not ids:
        return []
    async with r.pipeline(transaction=False) as p:
        for i in ids:
            p.hgetall(keys.worker_info(i))
        infos = await p.execute()
    return [WorkerEntry.from_fields(i, raw) for i, raw in zip(ids, infos, strict=True)]


async def live_addresses(r: Client, keys: RedisKeys, group: str) -> list[str]:
    """The addresses of the registered workers of ``group`` whose heartbeat key is alive."""
    ids = [i.decode() for i in await r.smembers(keys.workers())]
    if not ids:
        return []
    async with r.pipeline(transaction=False) as p:
        for i in ids:
            p.get(keys.worker_alive(i))
            p.hget(keys.worker_info(i), "group")
        replies = await p.execute()
    alive, groups = replies[0::2], replies[1::2]
    return [
        a.decode() for a, g in zip(alive, groups, strict=True)
        if a and (g.decode() if g else DEFAULT_GROUP) == group
    ]
