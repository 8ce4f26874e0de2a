"""The scheduler's state of record in Redis: KV blocks, block tables, generated tokens.

Per worker: a set of free blocks, a sorted set of cached unreferenced blocks (LRU by score), the
prefix index (block hash -> block), which worker instance all that describes, and a token log.
Per request: a hash (prompt, sampling, worker, priority, handle), its block table (a list) and
its output tokens (a list).

A step's new tokens go to the worker's token log, one APPEND of packed (handle, token) pairs,
not one list push per request: Redis's work per step stays constant as the batch grows. The log
is checkpointed into the per-request lists when it grows large, when a request finishes or moves,
and at recovery; a request's output is its list followed by its entries in the log.

Every change of a step is queued here and written as one MULTI/EXEC pipeline (one round trip per
step, never per sequence), so a crash at any instant leaves Redis at a step boundary. Blocks are
written as their final state after the step, which cannot get the order of intermediate moves
wrong. The in-memory scheduler is authoritative between writes; Redis is what a restarted
scheduler reloads and what routers read.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis

from pagewire.redis_keys import RedisKeys
from pagewire.sampling import SamplingParams
from pagewire.v1 import common_pb2
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.request import Request

FINISHED_TTL_S = 120  # a finished request's tokens stay this long, for a router to resume
CHECKPOINT_LOG_BYTES = 1 << 20  # token log size that triggers a checkpoint (128k tokens)
# What a Redis outage looks like to the client (a restart, a dropped connection).
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

# Append many integers to many lists in one command. ARGV[1] is the list names concatenated,
# ARGV[2] their byte lengths, ARGV[3] how many values each list gets, ARGV[4] the values (all
# counts packed little-endian int32). One command per step instead of one RPUSH per request, and
# four arguments instead of one per list: the client's per-argument cost dominates at 256+
# requests. (The names travel as data; KEYS[1], the token log, routes the call to the slot that
# the shared {deployment:model} hash tag puts every one of them in.)
APPEND_LISTS = """
local names, lengths, counts, values = ARGV[1], ARGV[2], ARGV[3], ARGV[4]  -- KEYS[1]: routing
local at, pos = 1, 1
for i = 1, #lengths / 4 do
  local len = struct.unpack('<i4', lengths, (i - 1) * 4 + 1)
  local n = struct.unpack('<i4', counts, (i - 1) * 4 + 1)
  local name = string.sub(names, at, at + len - 1)
  for first = 1, n, 4096 do  -- in chunks: Lua's unpack has a stack limit
    local items = {}
    for j = 1, math.min(4096, n - first + 1) do
      items[j], pos = struct.unpack('<i4', values, pos)
    end
    redis.call('RPUSH', name, unpack(items))
  end
  at = at + len
end
return #lengths / 4
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
    pooling: int = common_pb2.POOLING_NONE
    handle: int = 0  # its id in the worker's token log
    checkpointed: int = 0  # output tokens that were in its own list (the rest came from the log)


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
        # List appends, written by one script call: key i gets the next counts[i] values.
        self._last: asyncio.Future[None] | None = None  # the latest write in flight
        # Bumped by resync(): writes queued before it are covered by it and must not also land.
        self.generation = 0
        self._log = array("i")  # this write's (handle, token) pairs
        self.log_bytes = 0  # the token log's size in Redis since the last checkpoint
        self._keys: list[str] = []
        self._counts: list[int] = []
        self._values: list[int] = []

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
        logged: dict[int, list[int]] = {}
        pairs = _unpack(await self.r.get(k.token_log(w)) or b"")
        for handle, token in zip(pairs[::2], pairs[1::2], strict=True):
            logged.setdefault(handle, []).append(token)
        self.log_bytes = len(pairs) * 4
        for rid in sorted(r.decode() for r in await self.r.smembers(k.requests())):
            stored = await self.load_request(rid)
            if stored is not None and stored[1] == w:
                req = stored[0]
                req.checkpointed = len(req.output)
                req.output += logged.get(req.handle, [])
                pool.requests.append(req)
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
            pooling=int(info.get(b"pooling", 0)),
            handle=int(info.get(b"handle", 0)),
        )
        return stored, info[b"worker"].decode()

    async def reset(self, instance_id: str, num_blocks: int) -> None:
        """Start this worker's bookkeeping from scratch: all blocks free, nothing cached."""
        k, w = self.keys, self.worker_id
        async with self.r.pipeline(transaction=True) as p:
            p.delete(k.free_blocks(w), k.cached_blocks(w), k.prefix_index(w), k.token_log(w))
            if num_blocks:
                p.sadd(k.free_blocks(w), *range(num_blocks))
            p.hset(k.worker_state(w), mapping={"instance_id": instance_id, "num_blocks": num_blocks})
            await p.execute()

    async def forget_worker(self) -> None:
        """The worker is gone for good: drop its KV bookkeeping (its requests moved elsewhere)."""
        k, w = self.keys, self.worker_id
        await self.r.delete(
            k.free_blocks(w), k.cached_blocks(w), k.prefix_index(w), k.worker_state(w), k.worker_load(w),
            k.token_log(w),
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
                "pooling": req.pooling,
                "handle": req.seq_id,
            },
        )
        p.sadd(k.requests(), req.request_id)
        self._queued += 2
        req.tokens_key = k.request_tokens(req.request_id)

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
            self._keys.append(key)
            self._counts.append(len(values))
            self._values.extend(values)

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

    def generated(self, req: Request) -> None:
        """Queue the request's output tokens Redis does not have yet (usually exactly one)."""
        n = len(req.output) - req.queued
        if n <= 0:
            return
        log = self._log
        if n == 1:
            log.append(req.seq_id)
            log.append(req.output[-1])
        else:
            for token in req.output[req.queued:]:
                log.append(req.seq_id)
                log.append(token)
        req.queued = len(req.output)

    def _checkpoint_one(self, req: Request) -> None:
        if req.queued > req.checkpointed:
            if not req.tokens_key:
                req.tokens_key = self.keys.request_tokens(req.request_id)
            self._append(req.tokens_key, req.output[req.checkpointed : req.queued])
            req.checkpointed = req.queued

    def checkpoint(self, reqs: list[Request], handles: bool = False) -> None:
        """Move every logged token of ``reqs`` (all the worker's live requests) into their lists
        and empty the log. ``handles``: also record each request's current log handle (after a
        recovery, where requests got new ones)."""
        for req in reqs:
            self._checkpoint_one(req)
            if handles:
                self._pipe.hset(self.keys.request(req.request_id), "handle", req.seq_id)
                self._queued += 1
        self._flush_appends()
        self._log = array("i")
        self._pipe.delete(self.keys.token_log(self.worker_id))
        self._queued += 1
        self.log_bytes = 0

    def finished(self, req: Request) -> None:
        """Blocks are gone; output stays a while so a router can still resume and replay it."""
        self._checkpoint_one(req)
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
        if not self._keys:
            return
        names = [k.encode() for k in self._keys]
        lengths = array("i", map(len, names)).tobytes()
        counts = array("i", self._counts).tobytes()
        values = array("i", self._values).tobytes()
        # EVAL with the body, not EVALSHA: nothing to reload after a Redis restart; Redis caches
        # the compiled script by its hash anyway.
        self._pipe.eval(APPEND_LISTS, 1, self.keys.token_log(self.worker_id), b"".join(names),
                        lengths, counts, values)
        self._keys, self._counts, self._values = [], [], []
        self._queued += 1

    def write(self) -> asyncio.Future[None]:
        """Send everything queued so far as one MULTI/EXEC round trip, without waiting for it.

        Writes land in the order they were started (each waits for the one before), so the
        caller can go on preparing the next step while Redis applies this one.
        """
        self._flush_appends()
        if self._log:
            raw = self._log.tobytes()
            self._pipe.append(self.keys.token_log(self.worker_id), raw)
            self._queued += 1
            self.log_bytes += len(raw)
            self._log = array("i")
        pipe, queued, prev, generation = self._pipe, self._queued, self._last, self.generation
        self._pipe, self._queued = self.r.pipeline(transaction=True), 0

        async def run() -> None:
            if prev is not None:
                await asyncio.wait([prev])  # its failure is its own caller's to handle
            if queued and generation == self.generation:
                await pipe.execute()

        self._last = asyncio.ensure_future(run())
        return self._last

    async def resync(self, instance_id: str, pool: BlockPool, reqs: list[Request]) -> None:
        """Rewrite everything Redis holds for this worker from memory, in one transaction.

        After an outage Redis may be empty (restarted) or may have missed writes; either way the
        scheduler's memory is the truth, and this makes Redis equal to it again. Writes queued
        before this call describe changes the snapshot already contains: they are dropped.
        """
        k, w = self.keys, self.worker_id
        self.generation += 1
        self._pipe, self._queued, self._log = self.r.pipeline(transaction=True), 0, array("i")
        self._keys, self._counts, self._values = [], [], []
        live = {r.request_id for r in reqs}
        members = [m.decode() for m in await self.r.smembers(k.requests())]
        async with self.r.pipeline(transaction=False) as p:
            for m in members:
                p.hget(k.request(m), "worker")
            workers = await p.execute() if members else []
        stale = [m for m, o in zip(members, workers, strict=True) if o == w.encode() and m not in live]
        free = [b for b in range(pool.num_blocks) if pool.ref_count[b] == 0 and pool.block_hash[b] is None]
        now = time.time()
        async with self.r.pipeline(transaction=True) as p:
            p.delete(k.free_blocks(w), k.cached_blocks(w), k.prefix_index(w), k.token_log(w))
            if free:
                p.sadd(k.free_blocks(w), *free)
            if pool.cached_free:
                p.zadd(k.cached_blocks(w), {b: now + i * 1e-6 for i, b in enumerate(pool.cached_free)})
            if pool.index:
                p.hset(k.prefix_index(w), mapping=pool.index)  # type: ignore[arg-type]
            p.hset(k.worker_state(w), mapping={"instance_id": instance_id, "num_blocks": pool.num_blocks})
            if stale:
                p.srem(k.requests(), *stale)
            for req in reqs:
                rid = req.request_id
                p.hset(k.request(rid), mapping={
                    "worker": w, "priority": req.priority, "prompt": _pack(req.prompt),
                    "params": req.params.to_proto().SerializeToString(), "pooling": req.pooling,
                    "handle": req.seq_id, "num_cached": max(req.num_cached, 0),
                })
                p.sadd(k.requests(), rid)
                p.delete(k.request_blocks(rid), k.request_tokens(rid))
                if req.block_table:
                    p.rpush(k.request_blocks(rid), *req.block_table)
                if req.output:
                    p.rpush(k.request_tokens(rid), *req.output)
            await p.execute()
        for req in reqs:
            req.queued = req.checkpointed = len(req.output)
        self.log_bytes = 0

    async def flush(self) -> None:
        """Write everything queued and wait until Redis has it (and every earlier write)."""
        await self.write()
