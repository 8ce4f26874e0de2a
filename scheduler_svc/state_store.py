"""The scheduler's state of record in Redis: KV blocks, block tables, generated tokens.

Per worker: a set of free blocks, a sorted set of cached unreferenced blocks (LRU by score), the
prefix index (block hash -> block) and which worker instance all that describes. Per request: a
hash (prompt, sampling, worker, priority), its block table (a list) and its output tokens (a list).

Every change of a step is queued here and written as one MULTI/EXEC pipeline (one round trip per
step, never per sequence), so a crash at any instant leaves Redis at a step boundary. Blocks are
written as their final state after the step, which cannot get the order of intermediate moves
wrong. The in-memory scheduler is authoritative between writes; Redis is what a restarted
scheduler reloads and what routers read.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from pagewire.redis_keys import RedisKeys
from pagewire.sampling import SamplingParams
from pagewire.v1 import common_pb2
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.request import Request

FINISHED_TTL_S = 120  # a finished request's tokens stay this long, for a router to resume

# Append many integers to many lists in one command: KEYS are the lists, ARGV[1] the count for
# each list and ARGV[2] all the values, both packed little-endian int32. One command per step
# instead of one RPUSH per request: the client-side cost of a command dominates at 256+ requests.
APPEND_LISTS = """
local counts, values, pos = ARGV[1], ARGV[2], 1
for i = 1, #KEYS do
  local n = struct.unpack('<i4', counts, (i - 1) * 4 + 1)
  local items = {}
  for j = 1, n do
    items[j], pos = struct.unpack('<i4', values, pos)
  end
  redis.call('RPUSH', KEYS[i], unpack(items))
end
return #KEYS
"""


def _pack(ids: list[int]) -> bytes:
    return array("i", ids).tobytes()


def _unpack(raw: bytes) -> list[int]:
    out = array("i")
    out.frombytes(raw)
    return out.tolist()


@dataclass
class StoredRequest:
    """A request as Redis holds it: enough to resume it by recompute or to replay its output."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    priority: int
    output: list[int]
    block_table: list[int]
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    num_cached: int = 0


@dataclass
class StoredPool:
    instance_id: str
    num_blocks: int
    cached_lru: list[int]  # oldest first
    index: dict[bytes, int]
    requests: list[StoredRequest] = field(default_factory=list)


class StateStore:
    def __init__(self, client: aioredis.Redis, keys: RedisKeys, worker_id: str) -> None:
        self.r = client
        self.keys = keys
        self.worker_id = worker_id
        self._pipe = client.pipeline(transaction=True)
        self._queued = 0
        self._appends: dict[str, list[int]] = {}  # list key -> values, written by one script call

    # ---- start-up ----------------------------------------------------------------------
    async def load(self) -> StoredPool | None:
        """What Redis holds for this worker, or None if it holds nothing."""
        k, w = self.keys, self.worker_id
        state = await self.r.hgetall(k.worker_state(w))
        if not state:
            return None
        cached = await self.r.zrange(k.cached_blocks(w), 0, -1)
        index = await self.r.hgetall(k.prefix_index(w))
        pool = StoredPool(
            instance_id=state[b"instance_id"].decode(),
            num_blocks=int(state[b"num_blocks"]),
            cached_lru=[int(b) for b in cached],
            index={h: int(b) for h, b in index.items()},
        )
        for rid in sorted(r.decode() for r in await self.r.smembers(k.requests())):
            stored = await self.load_request(rid)
            if stored is not None and stored[1] == w:
                pool.requests.append(stored[0])
        return pool

    async def load_request(self, rid: str) -> tuple[StoredRequest, str] | None:
        """One request and the worker it ran on (a finished one too, while its TTL lasts)."""
        k = self.keys
        async with self.r.pipeline(transaction=False) as p:
            p.hgetall(k.request(rid))
            p.lrange(k.request_tokens(rid), 0, -1)
            p.lrange(k.request_blocks(rid), 0, -1)
            info, tokens, blocks = await p.execute()
        if not info:
            return None
        params = SamplingParams.from_proto(common_pb2.SamplingParams.FromString(info[b"params"]))
        stored = StoredRequest(
            request_id=rid,
            prompt=_unpack(info[b"prompt"]),
            params=params,
            priority=int(info[b"priority"]),
            output=[int(t) for t in tokens],
            block_table=[int(b) for b in blocks],
            finish_reason=int(info.get(b"finish_reason", 0)),
            num_cached=int(info.get(b"num_cached", 0)),
        )
        return stored, info[b"worker"].decode()

    async def reset(self, instance_id: str, num_blocks: int) -> None:
        """Start this worker's bookkeeping from scratch: all blocks free, nothing cached."""
        k, w = self.keys, self.worker_id
        async with self.r.pipeline(transaction=True) as p:
            p.delete(k.free_blocks(w), k.cached_blocks(w), k.prefix_index(w))
            if num_blocks:
                p.sadd(k.free_blocks(w), *range(num_blocks))
            p.hset(k.worker_state(w), mapping={"instance_id": instance_id, "num_blocks": num_blocks})
            await p.execute()

    async def forget_worker(self) -> None:
        """The worker is gone for good: drop its KV bookkeeping (its requests moved elsewhere)."""
        k, w = self.keys, self.worker_id
        await self.r.delete(
            k.free_blocks(w), k.cached_blocks(w), k.prefix_index(w), k.worker_state(w), k.worker_load(w)
        )

    # ---- per step ----------------------------------------------------------------------
    def admitted(self, req: Request) -> None:
        """Record a new request (or its move to this worker): the prompt and how to sample."""
        k, p = self.keys, self._pipe
        p.hset(
            k.request(req.request_id),
            mapping={
                "worker": self.worker_id,
                "priority": req.priority,
                "prompt": _pack(req.prompt),
                "params": req.params.to_proto().SerializeToString(),
            },
        )
        p.sadd(k.requests(), req.request_id)
        self._queued += 2

    def table(self, req: Request) -> None:
        """Write the whole block table (on admission, when it may start with cached blocks)."""
        self._flush_appends()
        k, p = self.keys, self._pipe
        p.delete(k.request_blocks(req.request_id))
        if req.block_table:
            p.rpush(k.request_blocks(req.request_id), *req.block_table)
        p.hset(k.request(req.request_id), "num_cached", max(req.num_cached, 0))
        self._queued += 3

    def _append(self, key: str, values: list[int]) -> None:
        if values:
            self._appends.setdefault(key, []).extend(values)

    def appended(self, req: Request, blocks: list[int]) -> None:
        self._append(self.keys.request_blocks(req.request_id), blocks)

    def dropped_table(self, req: Request) -> None:
        self._flush_appends()  # appends queued before the drop must land before it
        self._pipe.delete(self.keys.request_blocks(req.request_id))
        self._queued += 1

    def blocks(self, pool: BlockPool) -> None:
        """Final state of every block that moved since the last step, in a fixed number of commands."""
        dirty, unhashed = pool.drain_dirty()
        if not dirty and not unhashed:
            return
        k, w, p = self.keys, self.worker_id, self._pipe
        free = [b for b in dirty if pool.ref_count[b] == 0 and pool.block_hash[b] is None]
        cached = [b for b in dirty if pool.ref_count[b] == 0 and pool.block_hash[b] is not None]
        hashed = {pool.block_hash[b]: b for b in dirty if pool.block_hash[b] is not None}
        not_free = set(dirty) - set(free)
        not_cached = set(dirty) - set(cached)
        gone = [h for h in unhashed if h not in pool.index]
        now = time.time()
        if free:
            p.sadd(k.free_blocks(w), *free)
        if not_free:
            p.srem(k.free_blocks(w), *not_free)
        if cached:
            p.zadd(k.cached_blocks(w), {b: now for b in cached})
        if not_cached:
            p.zrem(k.cached_blocks(w), *not_cached)
        if gone:
            p.hdel(k.prefix_index(w), *gone)
        if hashed:
            p.hset(k.prefix_index(w), mapping=hashed)  # type: ignore[arg-type]
        self._queued += 6

    def generated(self, req: Request, tokens: list[int]) -> None:
        self._append(self.keys.request_tokens(req.request_id), tokens)

    def finished(self, req: Request) -> None:
        """Blocks are gone; output stays a while so a router can still resume and replay it."""
        self._flush_appends()
        k, p, rid = self.keys, self._pipe, req.request_id
        p.delete(k.request_blocks(rid))
        p.hset(k.request(rid), "finish_reason", req.finish_reason)
        p.expire(k.request(rid), FINISHED_TTL_S)
        p.expire(k.request_tokens(rid), FINISHED_TTL_S)
        p.srem(k.requests(), rid)
        self._queued += 5

    def publish_load(self, **figures: int) -> None:
        """Per-worker load figures (running, waiting, blocks, preemptions) that routers read."""
        self._pipe.hset(self.keys.worker_load(self.worker_id), mapping=figures)
        self._queued += 1

    def _flush_appends(self) -> None:
        """Queue the pending list appends as one script call, keeping command order intact."""
        if not self._appends:
            return
        keys = list(self._appends)
        counts = array("i", [len(v) for v in self._appends.values()]).tobytes()
        values = array("i", [x for v in self._appends.values() for x in v]).tobytes()
        # EVAL with the body, not EVALSHA: nothing to reload after a Redis restart; Redis caches
        # the compiled script by its hash anyway.
        self._pipe.eval(APPEND_LISTS, len(keys), *keys, counts, values)
        self._appends = {}
        self._queued += 1

    async def flush(self) -> None:
        """Write everything queued since the last flush in one MULTI/EXEC round trip."""
        self._flush_appends()
        if not self._queued:
            return
        pipe, self._pipe, self._queued = self._pipe, self.r.pipeline(transaction=True), 0
        await pipe.execute()
