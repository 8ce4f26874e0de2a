"""The ordered write path to Redis for one worker: one round trip per step, landing in order,
and the whole-state writes around it (reset, forget, resync after an outage).

A write is taken (:meth:`StoreWrites.take`) when its step's results are applied, and sent
(:meth:`StoreWrites.send`) by the task that later emits the step's events: each write first
waits for the one taken before it, so writes land in step order while the step loop goes on.
A resync bumps ``generation``: writes taken before it are covered by its snapshot and dropped.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection

from pagewire.redis_client import Client, is_cluster
from pagewire.redis_keys import RedisKeys
from pagewire.store_outage import StateLost
from scheduler_svc import images
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.request import Request
from scheduler_svc.step_write import pack
from scheduler_svc.stored_state import request_fields, worker_state


@dataclass
class Write:
    """One round trip's worth of queued changes (see StoreWrites.take)."""

    pipe: Pipeline | None  # MULTI/EXEC of other commands, ending with the step script; or None
    step: list[bytes | float | int | str] | None  # the step script's arguments, when sent alone
    generation: int
    previous: asyncio.Future[None] | None  # landed (or failed) once the write before it has
    landed: asyncio.Future[None]


class StoreWrites:
    def __init__(self, client: Client, keys: RedisKeys, worker_id: str) -> None:
        self.r = client
        self.keys = keys
        self.worker_id = worker_id
        k, w = keys, worker_id
        self._cluster = is_cluster(client)
        self._step_keys: tuple[bytes | str, ...] = (
            k.token_log(w), k.free_blocks(w), k.cached_blocks(w), k.prefix_index(w), k.worker_load(w))
        # Commands other than the step script, in order (None: none queued this write).
        self._pipe: Pipeline | None = None
        self._last: asyncio.Future[None] | None = None  # the latest write's landed
        self._conn: AbstractConnection | None = None  # for steps written by one script call
        # Bumped by resync(): writes queued before it are covered by it and must not also land.
        self.generation = 0
        # Redis was found without this worker's state: every write fails (StateLost) until a
        # resync has rewritten it.
        self.lost = False
        self.log_bytes = 0

    # What the subclass queues for the step script; None when nothing changed.
    def _take_step(self) -> list[bytes | float | int | str] | None:
        raise NotImplementedError

    def _drop_queued(self) -> None:
        self._pipe = None

    def _commands(self) -> Pipeline:
        if self._pipe is None:
            self._pipe = self.r.pipeline(transaction=True)
        return self._pipe

    # ---- one write per step ------------------------------------------------------------
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

    async def _eval(self, args: list[bytes | float | int | str]) -> None:
        """The steady-state step write on a connection of the store's own: none of the client's
        per-command machinery (pool checkout, retry wrapper, event hooks) on the hot path. The
        connection reconnects on its next use after an error; an error reply raises. On a
        cluster the client sends it: it knows which node owns the slot now and follows MOVED and
        ASK while a slot moves."""
        if self._cluster:
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

    async def flush(self) -> None:
        """Write everything queued and wait until Redis has it (and every earlier write)."""
        await self.write()

    # ---- the worker's whole state ------------------------------------------------------
    async def reset(self, instance_id: str, num_blocks: int) -> None:
        """Start this worker's bookkeeping from scratch: all blocks free, nothing cached."""
        k, w = self.keys, self.worker_id
        async with self.r.pipeline(transaction=True) as p:
            p.delete(k.free_blocks(w), k.cached_blocks(w), k.prefix_index(w), k.token_log(w))
            if num_blocks:
                p.sadd(k.free_blocks(w), *range(num_blocks))
            p.hset(k.worker_state(w), mapping=worker_state(instance_id, num_blocks))
            await p.execute()

    async def forget_worker(self) -> None:
        """The worker is gone for good: drop its KV bookkeeping (its requests moved elsewhere)."""
        k, w = self.keys, self.worker_id
        await self.r.delete(
            k.free_blocks(w), k.cached_blocks(w), k.prefix_index(w), k.worker_state(w), k.worker_load(w),
            k.token_log(w),
        )

    async def resync(self, instance_id: str, pool: BlockPool, reqs: list[Request]) -> None:
        """Rewrite everything Redis holds for this worker from memory, in one transaction.

        After an outage Redis may be empty (restarted) or may have missed writes; either way the
        scheduler's memory is the truth, and this makes Redis equal to it again. Writes queued
        before this call describe changes the snapshot already contains: they are dropped.
        """
        k, w = self.keys, self.worker_id
        self.generation += 1
        self._drop_queued()
        stale = await self._stale_requests({r.request_id for r in reqs})
        free, cached = pool.places(range(pool.num_blocks))
        now = time.time()
        async with self.r.pipeline(transaction=True) as p:
            p.delete(k.free_blocks(w), k.cached_blocks(w), k.prefix_index(w), k.token_log(w))
            if free:
                p.sadd(k.free_blocks(w), *free)
            if pool.cached_free:
                p.zadd(k.cached_blocks(w), {b: now + i * 1e-6 for i, b in enumerate(pool.cached_free)})
            if pool.index:
                p.hset(k.prefix_index(w), mapping=pool.index)  # type: ignore[arg-type]
            p.hset(k.worker_state(w), mapping=worker_state(instance_id, pool.num_blocks))
            if stale:
                p.srem(k.requests(), *stale)
            for req in reqs:
                rid = req.request_id
                p.hset(k.request(rid), mapping=request_fields(req, w) | {
                    "num_cached": max(req.num_cached, 0)})
                if req.images:
                    p.set(k.request_images(rid), images.pack(req.images), ex=images.IMAGES_TTL_S)
                p.sadd(k.requests(), rid)
                p.delete(k.request_blocks(rid), k.request_tokens(rid))
                if req.block_table:
                    p.rpush(k.request_blocks(rid), *req.block_table)
                if req.output:
                    p.set(k.request_tokens(rid), pack(req.output))
            await p.execute()
        for req in reqs:
            req.num_logged = req.num_checkpointed = len(req.output)
        self.log_bytes = 0
        self.lost = False

    async def _stale_requests(self, live: set[str]) -> list[str]:
        """Requests Redis lists on this worker that it no longer holds."""
        k = self.keys
        members = [m.decode() for m in await self.r.smembers(k.requests())]
        async with self.r.pipeline(transaction=False) as p:
            for m in members:
                p.hget(k.request(m), "worker")
            workers = await p.execute() if members else []
        mine = self.worker_id.encode()
        return [m for m, o in zip(members, workers, strict=True) if o == mine and m not in live]
