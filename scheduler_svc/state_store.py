"""The scheduler's state of record in Redis: KV blocks, block tables, generated tokens.

Per worker: a set of free blocks, a sorted set of cached unreferenced blocks (LRU by score), the
prefix index (block hash -> block), which worker instance all that describes, and a token log.
Per request: a hash (prompt, sampling, worker, priority, handle), its block table (a list) and
its output tokens (a string of packed int32).

A step's new tokens go to the worker's token log, one APPEND of packed (handle, token) pairs,
not one list push per request: Redis's work per step stays constant as the batch grows. The log
is checkpointed into the per-request token strings (one APPEND of bytes each, nothing for Redis
to parse per token) when it grows large, when a request finishes or moves, and at recovery; a
request's output is its string followed by its entries in the log.

Every change of a step is queued here and written in one round trip per step, never per
sequence: one script call (STEP_WRITE), inside a MULTI/EXEC when the step also has other
commands, so a crash at any instant leaves Redis at a step boundary. Blocks are
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
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection

from pagewire.block_hash import DIGEST_BYTES
from pagewire.redis_client import Client, is_cluster
from pagewire.redis_keys import RedisKeys
from pagewire.sampling import SamplingParams
from pagewire.v1 import common_pb2
from scheduler_svc import images
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.request import Request

FINISHED_TTL_S = 120  # a finished request's tokens stay this long, for a router to resume
CHECKPOINT_LOG_BYTES = 1 << 20  # token log size that triggers a checkpoint (128k tokens)


class StateLost(redis.exceptions.ConnectionError):
    """Redis answers but no longer holds this worker's state (it restarted empty while no write
    was in flight to notice): handled like a failed write, by a resync."""



# The whole of a step's regular writes in one command, every integer list packed into one binary
# argument (little-endian int32): redis-py's cost per argument, not Redis's, dominated at 256+
# requests. One script call is atomic on its own, so a step with nothing else to write needs no
# MULTI/EXEC around it. KEYS: the token log, free blocks, cached blocks, prefix index, load (on a
# Redis Cluster, then the keys ARGV names, declared only for the cluster's routing).
# ARGV[1..4]: integers to push onto lists (block tables) -- the list names concatenated, their
# byte lengths, how many values each list gets, the values (the names travel as data: every key
# shares the {deployment:model} hash tag, so they are in the slot KEYS route the call to).
# ARGV[5]: bytes for the token log. ARGV[6..8]: bytes to append to strings (requests' token
# strings) -- names concatenated, their byte lengths, the bytes of each, the bytes concatenated.
# ARGV[10], ARGV[11]: blocks to add to / remove from the free set. ARGV[12]: the score of
# ARGV[13], blocks to add to the cached set; ARGV[14]: blocks to remove from it. ARGV[15]: the
# hash width; ARGV[16]: hashes to remove from the prefix index; ARGV[17], ARGV[18]: hashes to set,
# and their blocks. ARGV[19...]: load figures, field and value pairs.
STEP_WRITE = """
local function ints(packed)
  local out, pos = {}, 1
  for i = 1, #packed / 4 do
    out[i], pos = struct.unpack('<i4', packed, pos)
  end
  return out
end
local function call(command, key, items, first, last)  -- in chunks: Lua's unpack has a limit
  for i = first, last, 4096 do
    redis.call(command, key, unpack(items, i, math.min(i + 4095, last)))
  end
end
local names, at, pos = ARGV[1], 1, 0
local counted, all = ints(ARGV[3]), ints(ARGV[4])
for i, len in ipairs(ints(ARGV[2])) do
  call('RPUSH', string.sub(names, at, at + len - 1), all, pos + 1, pos + counted[i])
  at, pos = at + len, pos + counted[i]
end
if #ARGV[5] > 0 then redis.call('APPEND', KEYS[1], ARGV[5]) end
local sizes, data = ints(ARGV[8]), ARGV[9]
names, at, pos = ARGV[6], 1, 1
for i, len in ipairs(ints(ARGV[7])) do
  redis.call('APPEND', string.sub(names, at, at + len - 1), string.sub(data, pos, pos + sizes[i] - 1))
  at, pos = at + len, pos + sizes[i]
end
local free, taken = ints(ARGV[10]), ints(ARGV[11])
call('SADD', KEYS[2], free, 1, #free)
call('SREM', KEYS[2], taken, 1, #taken)
local cached, uncached = ints(ARGV[13]), ints(ARGV[14])
local scored = {}
for i, b in ipairs(cached) do scored[2 * i - 1], scored[2 * i] = ARGV[12], b end
call('ZADD', KEYS[3], scored, 1, #scored)
call('ZREM', KEYS[3], uncached, 1, #uncached)
local width = tonumber(ARGV[15])
local gone = {}
for i = 1, #ARGV[16] / width do gone[i] = string.sub(ARGV[16], (i - 1) * width + 1, i * width) end
call('HDEL', KEYS[4], gone, 1, #gone)
local hashed, entries = ints(ARGV[18]), {}
for i, b in ipairs(hashed) do
  entries[2 * i - 1], entries[2 * i] = string.sub(ARGV[17], (i - 1) * width + 1, i * width), b
end
call('HSET', KEYS[4], entries, 1, #entries)
if #ARGV > 18 then redis.call('HSET', KEYS[5], unpack(ARGV, 19)) end
return 1
"""
# ARGV[10..18] of a step that moved no block.
_NO_BLOCKS = (b"", b"", b"0", b"", b"", DIGEST_BYTES, b"", b"", b"")
_NO_APPENDS = (b"",) * 4


@dataclass
class Write:
    """One round trip's worth of queued changes (see StateStore.take)."""

    pipe: Pipeline | None  # MULTI/EXEC of other commands, ending with the step script; or None
    step: list[bytes | float | int] | None  # the step script's arguments, when sent alone
    generation: int
    previous: asyncio.Future[None] | None  # landed (or failed) once the write before it has
    landed: asyncio.Future[None]


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
    images: list[common_pb2.ImageInput] = field(default_factory=list)
    images_lost: bool = False  # it had images and Redis no longer has them (TTL): not resumable
    cache_salt: bytes = b""


@dataclass
class StoredPool:
    instance_id: str
    num_blocks: int
    cached_lru: list[int]  # oldest first
    index: dict[bytes, int]
    requests: list[StoredRequest] = field(default_factory=list)


class StateStore:
    def __init__(self, client: Client, keys: RedisKeys, worker_id: str) -> None:
        self.r = client
        self.keys = keys
        self.worker_id = worker_id
        k, w = keys, worker_id
        self._cluster = is_cluster(client)
        self._step_keys = (k.token_log(w), k.free_blocks(w), k.cached_blocks(w), k.prefix_index(w),
                           k.worker_load(w))
        # Commands other than the step script, in order (None: none queued this write).
        self._pipe: Pipeline | None = None
        self._last: asyncio.Future[None] | None = None  # the latest write's landed
        self._conn: AbstractConnection | None = None  # for steps written by one script call
        # Bumped by resync(): writes queued before it are covered by it and must not also land.
        self.generation = 0
        # Redis was found without this worker's state: every write fails (StateLost) until a
        # resync has rewritten it.
        self.lost = False
        self._log = array("i")  # this write's (handle, token) pairs
        self.log_bytes = 0  # the token log's size in Redis since the last checkpoint
        # List appends, written by one script call: key i gets the next counts[i] values.
        self._keys: list[bytes] = []
        self._counts: list[int] = []
        self._values: list[int] = []
        # String appends (requests' tokens, packed int32): key i gets chunk i.
        self._string_keys: list[bytes] = []
        self._chunks: list[bytes] = []
        self._blocks: tuple[bytes | float | int, ...] = _NO_BLOCKS  # ARGV[10..18] of STEP_WRITE
        self._load: dict[str, int] = {}

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
            if stored is not None and stored[1] == w and not stored[0].images_lost:
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
            p.get(k.request_tokens(rid))
            p.lrange(k.request_blocks(rid), 0, -1)
            p.get(k.request_images(rid))
            info, tokens, blocks, image_data = await p.execute()
        if not info:
            return None
        params = SamplingParams.from_proto(common_pb2.SamplingParams.FromString(info[b"params"]))
        stored = StoredRequest(
            request_id=rid,
            prompt=_unpack(info[b"prompt"]),
            params=params,
            priority=int(info[b"priority"]),
            output=_unpack(tokens or b""),
            block_table=[int(b) for b in blocks],
            finish_reason=int(info.get(b"finish_reason", 0)),
            num_cached=int(info.get(b"num_cached", 0)),
            pooling=int(info.get(b"pooling", 0)),
            handle=int(info.get(b"handle", 0)),
            images=images.unpack(image_data),
            cache_salt=info.get(b"cache_salt", b""),
        )
        stored.images_lost = len(stored.images) != int(info.get(b"images", 0))
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
    def _commands(self) -> Pipeline:
        if self._pipe is None:
            self._pipe = self.r.pipeline(transaction=True)
        return self._pipe

    def admitted(self, req: Request) -> None:
        """Record a new request (or its move to this worker): the prompt and how to sample."""
        k, p = self.keys, self._commands()
        p.hset(
            k.request(req.request_id),
            mapping={
                "worker": self.worker_id,
                "priority": req.priority,
                "prompt": _pack(req.prompt),
                "params": req.params.to_proto().SerializeToString(),
                "pooling": req.pooling,
                "handle": req.seq_id,
                "images": len(req.images),
                "cache_salt": req.cache_salt,
            },
        )
        if req.images:
            p.set(k.request_images(req.request_id), images.pack(req.images), ex=images.IMAGES_TTL_S)
        p.sadd(k.requests(), req.request_id)
        req.tokens_key = k.request_tokens(req.request_id)

    def table(self, req: Request) -> None:
        """Write the whole block table (on admission, when it may start with cached blocks)."""
        self._flush_appends()
        k, p = self.keys, self._commands()
        p.delete(k.request_blocks(req.request_id))
        if req.block_table:
            p.rpush(k.request_blocks(req.request_id), *req.block_table)
        p.hset(k.request(req.request_id), "num_cached", max(req.num_cached, 0))

    def _append(self, key: str, values: list[int]) -> None:
        if values:
            self._keys.append(key.encode())
            self._counts.append(len(values))
            self._values.extend(values)

    def appended(self, req: Request, blocks: list[int]) -> None:
        self._append(self.keys.request_blocks(req.request_id), blocks)

    def dropped_table(self, req: Request) -> None:
        self._flush_appends()  # appends queued before the drop must land before it
        self._commands().delete(self.keys.request_blocks(req.request_id))

    def blocks(self, pool: BlockPool) -> None:
        """Final state of every block that moved since the last call, for the step's script."""
        dirty, unhashed = pool.drain_dirty()
        if not dirty and not unhashed:
            return
        if self._blocks is not _NO_BLOCKS:  # two calls in one write: the earlier one goes first
            self._queue_script(blocks=self._blocks)
        refs, hashes = pool.ref_count, pool.block_hash
        free = [b for b in dirty if refs[b] == 0 and hashes[b] is None]
        cached = [b for b in dirty if refs[b] == 0 and hashes[b] is not None]
        hashed = {hashes[b]: b for b in dirty if hashes[b] is not None}
        not_free = sorted(set(dirty) - set(free))
        not_cached = sorted(set(dirty) - set(cached))
        gone = b"".join(h for h in unhashed if h not in pool.index)
        names = b"".join(hashed)  # type: ignore[arg-type]
        assert len(names) == DIGEST_BYTES * len(hashed), "a block hash of another width"
        self._blocks = (_pack(free), _pack(not_free), time.time(), _pack(cached), _pack(not_cached),
                        DIGEST_BYTES, gone, names, _pack(list(hashed.values())))

    def generated(self, reqs: list[Request]) -> None:
        """Queue the output tokens Redis does not have yet (usually exactly one per request)."""
        log = self._log
        for req in reqs:
            out, queued = req.output, req.queued
            n = len(out) - queued
            if n == 1:
                log.append(req.seq_id)
                log.append(out[-1])
                req.queued = queued + 1
            elif n > 1:
                for token in out[queued:]:
                    log.append(req.seq_id)
                    log.append(token)
                req.queued = len(out)

    def _checkpoint_one(self, req: Request) -> None:
        if req.queued > req.checkpointed:
            if not req.tokens_key:
                req.tokens_key = self.keys.request_tokens(req.request_id)
            self._string_keys.append(req.tokens_key.encode())
            self._chunks.append(_pack(req.output[req.checkpointed : req.queued]))
            req.checkpointed = req.queued

    def checkpoint(self, reqs: list[Request], handles: bool = False) -> None:
        """Move every logged token of ``reqs`` (all the worker's live requests) into their lists
        and empty the log. ``handles``: also record each request's current log handle (after a
        recovery, where requests got new ones)."""
        for req in reqs:
            self._checkpoint_one(req)
            if handles:
                self._commands().hset(self.keys.request(req.request_id), "handle", req.seq_id)
        self._flush_appends()
        self._log = array("i")
        self._commands().delete(self.keys.token_log(self.worker_id))
        self.log_bytes = 0

    def finished(self, req: Request) -> None:
        """Blocks are gone; output stays a while so a router can still resume and replay it."""
        self._checkpoint_one(req)
        self._flush_appends()
        k, p, rid = self.keys, self._commands(), req.request_id
        p.delete(k.request_blocks(rid))
        p.hset(k.request(rid), "finish_reason", req.finish_reason)
        p.expire(k.request(rid), FINISHED_TTL_S)
        p.expire(k.request_tokens(rid), FINISHED_TTL_S)
        if req.images:
            p.delete(k.request_images(rid))
        p.srem(k.requests(), rid)

    def publish_load(self, **figures: int) -> None:
        """Per-worker load figures (running, waiting, blocks, preemptions) that routers read."""
        self._load.update(figures)

    def _take_appends(self) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """ARGV[1..4] and ARGV[6..9] of STEP_WRITE (the token log's ARGV[5] goes between), and
        the KEYS of the call: the step's five, and on a cluster every key the appends name."""
        lists = strings = _NO_APPENDS
        touched: list[bytes] = []
        if self._keys:
            names = self._keys
            lists = (b"".join(names), array("i", map(len, names)).tobytes(),
                     array("i", self._counts).tobytes(), array("i", self._values).tobytes())
            touched += names
            self._keys, self._counts, self._values = [], [], []
        if self._string_keys:
            names, chunks = self._string_keys, self._chunks
            strings = (b"".join(names), array("i", map(len, names)).tobytes(),
                       array("i", map(len, chunks)).tobytes(), b"".join(chunks))
            touched += names
            self._string_keys, self._chunks = [], []
        # A cluster decides where a script runs -- and, while its slot migrates, whether it must
        # wait (TRYAGAIN) or run on the new owner (ASK) -- from the keys it declares. A key the
        # script touches undeclared could be written on a node that no longer holds it.
        keys = (*self._step_keys, *dict.fromkeys(touched)) if self._cluster else self._step_keys
        return lists + strings, keys

    def _queue_script(self, appends: tuple[bytes, ...] = _NO_APPENDS * 2, log: bytes = b"",
                      blocks: tuple[bytes | float | int, ...] = _NO_BLOCKS,
                      keys: tuple[bytes | str, ...] | None = None) -> None:
        # EVAL with the body, not EVALSHA: nothing to reload after a Redis restart; Redis caches
        # the compiled script by its hash anyway.
        keys = keys or self._step_keys
        self._commands().eval(STEP_WRITE, len(keys), *keys, *appends[:4], log, *appends[4:], *blocks)

    def _flush_appends(self) -> None:
        """Queue the pending list and string appends as one script call, keeping command order."""
        if self._keys or self._string_keys:
            appends, keys = self._take_appends()
            self._queue_script(appends, keys=keys)

    def _take_step(self) -> list[bytes | float | int] | None:
        """The arguments of the step's script call, or None when the step changed nothing."""
        (appends, keys), log = self._take_appends(), b""
        if self._log:
            log = self._log.tobytes()
            self.log_bytes += len(log)
            self._log = array("i")
        blocks, load = self._blocks, self._load
        if not log and appends == _NO_APPENDS * 2 and blocks is _NO_BLOCKS and not load:
            return None
        self._blocks, self._load = _NO_BLOCKS, {}
        args: list[bytes | float | int] = [STEP_WRITE, len(keys), *keys,
                                            *appends[:4], log, *appends[4:], *blocks]
        for name, value in load.items():
            args += (name, value)
        return args

    def take(self) -> Write:
        """Everything queued so far, as one write to send: in steady state one script call, else
        one MULTI/EXEC pipeline that ends with it (one round trip per step either way)."""
        step = self._take_step()
        pipe, self._pipe = self._pipe, None
        if pipe is not None and step is not None:
            pipe.execute_command("EVAL", *step)
        w = Write(pipe, step, self.generation, self._last, asyncio.get_running_loop().create_future())
        self._last = w.landed
        return w

    async def send(self, w: Write) -> None:
        """Send a write taken by :meth:`take`, after the one taken before it has landed (writes
        land in the order they were taken), in the caller's task. Raises STORE_DOWN on failure."""
        try:
            if w.previous is not None and not w.previous.done():
                await w.previous  # its failure is its own caller's to handle
            if w.generation != self.generation:
                return  # a resync since it was taken rewrote everything it holds
            if self.lost:
                raise StateLost(f"Redis holds no state for worker {self.worker_id}")
            if w.pipe is not None:
                await w.pipe.execute()
            elif w.step is not None:
                await self._eval(w.step)
        finally:
            if not w.landed.done():
                w.landed.set_result(None)

    async def _eval(self, args: list[bytes | float | int]) -> None:
        """The steady-state step write on a connection of the store's own: none of the client's
        per-command machinery (pool checkout, retry wrapper, event hooks) on the hot path. The
        connection reconnects on its next use after an error; an error reply raises. On a
        cluster the client sends it: it knows which node owns the slot now and follows MOVED and
        ASK while a slot moves."""
        if is_cluster(self.r):
            await self.r.execute_command("EVAL", *args)
            return
        if self._conn is None:
            self._conn = await self.r.connection_pool.get_connection()
        await self._conn.send_command("EVAL", *args)
        await self._conn.read_response()

    def write(self) -> asyncio.Future[None]:
        """take() and send() in a task of its own: the caller can go on preparing the next step
        while Redis applies this one."""
        return asyncio.ensure_future(self.send(self.take()))

    async def resync(self, instance_id: str, pool: BlockPool, reqs: list[Request]) -> None:
        """Rewrite everything Redis holds for this worker from memory, in one transaction.

        After an outage Redis may be empty (restarted) or may have missed writes; either way the
        scheduler's memory is the truth, and this makes Redis equal to it again. Writes queued
        before this call describe changes the snapshot already contains: they are dropped.
        """
        k, w = self.keys, self.worker_id
        self.generation += 1
        self._pipe, self._log = None, array("i")
        self._keys, self._counts, self._values = [], [], []
        self._string_keys, self._chunks = [], []
        self._blocks, self._load = _NO_BLOCKS, {}
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
                    "images": len(req.images), "cache_salt": req.cache_salt,
                })
                if req.images:
                    p.set(k.request_images(rid), images.pack(req.images), ex=images.IMAGES_TTL_S)
                p.sadd(k.requests(), rid)
                p.delete(k.request_blocks(rid), k.request_tokens(rid))
                if req.block_table:
                    p.rpush(k.request_blocks(rid), *req.block_table)
                if req.output:
                    p.set(k.request_tokens(rid), _pack(req.output))
            await p.execute()
        for req in reqs:
            req.queued = req.checkpointed = len(req.output)
        self.log_bytes = 0
        self.lost = False

    async def flush(self) -> None:
        """Write everything queued and wait until Redis has it (and every earlier write)."""
        await self.write()
