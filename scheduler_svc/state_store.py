"""The scheduler's state of record in Redis, written: KV blocks, block tables, generated tokens.

(The layout is ``stored_state``'s, which reads it back.) A step's new tokens go to the worker's
token log, one APPEND of packed (handle, token) pairs, not one list push per request: Redis's
work per step stays constant as the batch grows. The log is checkpointed into the per-request
token strings (one APPEND of bytes each, nothing for Redis to parse per token) when it grows
large, when a request finishes or moves, and at recovery.

Every change of a step is queued here and written in one round trip per step, never per
sequence: one script call (``step_write``), inside a MULTI/EXEC when the step also has other
commands, so a crash at any instant leaves Redis at a step boundary. Blocks are written as their
final state after the step, which cannot get the order of intermediate moves wrong. Writes are
sent in the order they were taken (``store_writes``). The in-memory scheduler is authoritative
between writes; Redis is what a restarted scheduler reloads and what routers read.
"""

from __future__ import annotations

import time
from array import array

from pagewire.block_hash import DIGEST_BYTES
from pagewire.redis_client import Client
from pagewire.redis_keys import RedisKeys
from pagewire.worker_load import DRAINING, LoadFigures
from scheduler_svc import images
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.request import Request
from scheduler_svc.step_write import (
    NO_BLOCKS,
    NO_LISTS,
    NO_STRINGS,
    STEP_WRITE,
    BlockMoves,
    ListAppends,
    StepArgs,
    StringAppends,
    pack,
)
from scheduler_svc.store_writes import StoreWrites
from scheduler_svc.stored_state import StoredPool, load_pool, request_fields

FINISHED_TTL_S = 120  # a finished request's tokens stay this long, for a router to resume
CHECKPOINT_LOG_BYTES = 1 << 20  # token log size that triggers a checkpoint (128k tokens)


class StateStore(StoreWrites):
    """Queues one worker's changes; :meth:`take` hands them over as one write."""

    def __init__(self, client: Client, keys: RedisKeys, worker_id: str) -> None:
        super().__init__(client, keys, worker_id)
        self._log = array("i")  # this write's (handle, token) pairs
        self.log_bytes = 0  # the token log's size in Redis since the last checkpoint
        # List appends, written by one script call: key i gets the next counts[i] values.
        self._keys: list[bytes] = []
        self._counts: list[int] = []
        self._values: list[int] = []
        # String appends (requests' tokens, packed int32): key i gets chunk i.
        self._string_keys: list[bytes] = []
        self._chunks: list[bytes] = []
        self._blocks = NO_BLOCKS
        self._load: dict[str, int] = {}  # the worker's load figures to write

    def _drop_queued(self) -> None:
        super()._drop_queued()
        self._log = array("i")
        self._keys, self._counts, self._values = [], [], []
        self._string_keys, self._chunks = [], []
        self._blocks, self._load = NO_BLOCKS, {}

    async def load(self) -> StoredPool | None:
        """What Redis holds for this worker (``stored_state``), or None if it holds nothing."""
        found = await load_pool(self.r, self.keys, self.worker_id)
        if found is None:
            return None
        pool, self.log_bytes = found
        return pool

    # ---- requests ----------------------------------------------------------------------
    def admitted(self, req: Request) -> None:
        """Record a new request (or its move to this worker): the prompt and how to sample."""
        k, p = self.keys, self._commands()
        p.hset(k.request(req.request_id), mapping=request_fields(req, self.worker_id))
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

    def appended(self, req: Request, blocks: list[int]) -> None:
        if blocks:
            self._keys.append(self.keys.request_blocks(req.request_id).encode())
            self._counts.append(len(blocks))
            self._values.extend(blocks)

    def dropped_table(self, req: Request) -> None:
        self._flush_appends()  # appends queued before the drop must land before it
        self._commands().delete(self.keys.request_blocks(req.request_id))

    def generated(self, reqs: list[Request]) -> None:
        """Queue the output tokens Redis does not have yet (usually exactly one per request)."""
        log = self._log
        for req in reqs:
            out, logged = req.output, req.num_logged
            n = len(out) - logged
            if n == 1:
                log.append(req.seq_id)
                log.append(out[-1])
                req.num_logged = logged + 1
            elif n > 1:
                for token in out[logged:]:
                    log.append(req.seq_id)
                    log.append(token)
                req.num_logged = len(out)

    def _checkpoint_one(self, req: Request) -> None:
        if req.num_logged > req.num_checkpointed:
            if not req.tokens_key:
                req.tokens_key = self.keys.request_tokens(req.request_id)
            self._string_keys.append(req.tokens_key.encode())
            self._chunks.append(pack(req.output[req.num_checkpointed : req.num_logged]))
            req.num_checkpointed = req.num_logged

    def checkpoint(self, reqs: list[Request], handles: bool = False) -> None:
        """Move every logged token of ``reqs`` (all the worker's live requests) into their
        strings and empty the log. ``handles``: also record each request's current log handle
        (after a recovery, where requests got new ones)."""
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

    # ---- the worker --------------------------------------------------------------------
    def blocks(self, pool: BlockPool) -> None:
        """Final state of every block that moved since the last call, for the step's script."""
        dirty, unhashed = pool.drain_dirty()
        if not dirty and not unhashed:
            return
        if self._blocks is not NO_BLOCKS:  # two calls in one write: the earlier one goes first
            self._queue_script(StepArgs(b"", NO_LISTS, NO_STRINGS, self._blocks))
        hashes = pool.block_hash
        free, cached = pool.places(dirty)
        hashed = {hashes[b]: b for b in dirty if hashes[b] is not None}
        names = b"".join(hashed)  # type: ignore[arg-type]
        assert len(names) == DIGEST_BYTES * len(hashed), "a block hash of another width"
        self._blocks = BlockMoves(
            free_add=pack(free), free_remove=pack(sorted(set(dirty) - set(free))),
            cached_score=time.time(), cached_add=pack(cached),
            cached_remove=pack(sorted(set(dirty) - set(cached))),
            hashes_gone=b"".join(h for h in unhashed if h not in pool.index),
            hashes_set=names, hashes_set_blocks=pack(list(hashed.values())),
        )

    def publish_load(self, figures: LoadFigures) -> None:
        """The worker's load figures, written with this step (``pagewire.worker_load``)."""
        self._load.update(figures.as_dict())

    def publish_draining(self, draining: bool) -> None:
        """The draining flag alone: an idle worker has no step to carry its figures."""
        self._load[DRAINING] = int(draining)

    # ---- taking a write ----------------------------------------------------------------
    def _take_appends(self) -> tuple[ListAppends, StringAppends, tuple[bytes | str, ...]]:
        """The queued list and string appends, and the KEYS of the call: the step's five, and on
        a cluster every key the appends name."""
        lists, strings = NO_LISTS, NO_STRINGS
        touched: list[bytes] = []
        if self._keys:
            names = self._keys
            lists = ListAppends(b"".join(names), array("i", map(len, names)).tobytes(),
                                array("i", self._counts).tobytes(), array("i", self._values).tobytes())
            touched += names
            self._keys, self._counts, self._values = [], [], []
        if self._string_keys:
            names, chunks = self._string_keys, self._chunks
            strings = StringAppends(b"".join(names), array("i", map(len, names)).tobytes(),
                                    array("i", map(len, chunks)).tobytes(), b"".join(chunks))
            touched += names
            self._string_keys, self._chunks = [], []
        # A cluster decides where a script runs -- and, while its slot migrates, whether it must
        # wait (TRYAGAIN) or run on the new owner (ASK) -- from the keys it declares. A key the
        # script touches undeclared could be written on a node that no longer holds it.
        keys = (*self._step_keys, *dict.fromkeys(touched)) if self._cluster else self._step_keys
        return lists, strings, keys

    def _queue_script(self, args: StepArgs, keys: tuple[bytes | str, ...] | None = None) -> None:
        # EVAL with the body, not EVALSHA: nothing to reload after a Redis restart; Redis caches
        # the compiled script by its hash anyway.
        keys = keys or self._step_keys
        self._commands().eval(STEP_WRITE, len(keys), *keys, *args.argv())

    def _flush_appends(self) -> None:
        """Queue the pending list and string appends as one script call, keeping command order."""
        if self._keys or self._string_keys:
            lists, strings, keys = self._take_appends()
            self._queue_script(StepArgs(b"", lists, strings, NO_BLOCKS), keys)

    def _take_step(self) -> list[bytes | float | int | str] | None:
        """The arguments of the step's script call, or None when the step changed nothing."""
        lists, strings, keys = self._take_appends()
        log = b""
        if self._log:
            log = self._log.tobytes()
            self.log_bytes += len(log)
            self._log = array("i")
        blocks, load = self._blocks, self._load
        if (not log and lists is NO_LISTS and strings is NO_STRINGS and blocks is NO_BLOCKS
                and not load):
            return None
        self._blocks, self._load = NO_BLOCKS, {}
        args = [STEP_WRITE, len(keys), *keys, *StepArgs(log, lists, strings, blocks).argv()]
        for name, value in load.items():
            args += (name, value)
        return args
