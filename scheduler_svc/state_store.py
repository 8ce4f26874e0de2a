"""The scheduler's state of record in Redis: free blocks, block tables, generated tokens.

Every change of a step is queued here and written as one MULTI/EXEC pipeline (one round trip per
step, never per sequence). The in-memory scheduler is authoritative between writes; Redis is what
survives a restart and what routers read.
"""

from __future__ import annotations

from array import array

import redis.asyncio as aioredis

from pagewire.redis_keys import RedisKeys
from scheduler_svc.request import Request


class StateStore:
    def __init__(self, client: aioredis.Redis, keys: RedisKeys, worker_id: str) -> None:
        self.r = client
        self.keys = keys
        self.worker_id = worker_id
        self._pipe = client.pipeline(transaction=True)
        self._queued = 0

    async def init_pool(self, num_blocks: int) -> None:
        """Start the worker's free pool from scratch: all blocks free, no requests of its own."""
        k = self.keys
        stale = [
            rid.decode()
            for rid in await self.r.smembers(k.requests())
            if (await self.r.hget(k.request(rid.decode()), "worker") or b"").decode() == self.worker_id
        ]
        async with self.r.pipeline(transaction=True) as p:
            p.delete(k.free_blocks(self.worker_id))
            if num_blocks:
                p.sadd(k.free_blocks(self.worker_id), *range(num_blocks))
            for rid in stale:
                p.delete(k.request(rid), k.request_blocks(rid), k.request_tokens(rid))
                p.srem(k.requests(), rid)
            await p.execute()

    def admitted(self, req: Request) -> None:
        k, p = self.keys, self._pipe
        p.hset(
            k.request(req.request_id),
            mapping={
                "worker": self.worker_id,
                "seq_id": req.seq_id,
                "priority": req.priority,
                "prompt": array("i", req.prompt).tobytes(),
                "params": req.params.to_proto().SerializeToString(),
            },
        )
        p.sadd(k.requests(), req.request_id)
        self._queued += 2

    def allocated(self, req: Request, blocks: list[int]) -> None:
        if not blocks:
            return
        k, p = self.keys, self._pipe
        p.srem(k.free_blocks(self.worker_id), *blocks)
        p.rpush(k.request_blocks(req.request_id), *blocks)
        self._queued += 2

    def freed(self, req: Request, blocks: list[int]) -> None:
        k, p = self.keys, self._pipe
        if blocks:
            p.sadd(k.free_blocks(self.worker_id), *blocks)
        p.delete(k.request_blocks(req.request_id))
        self._queued += 2

    def generated(self, req: Request, tokens: list[int]) -> None:
        self._pipe.rpush(self.keys.request_tokens(req.request_id), *tokens)
        self._queued += 1

    def finished(self, req: Request) -> None:
        k, p = self.keys, self._pipe
        p.delete(k.request(req.request_id), k.request_blocks(req.request_id), k.request_tokens(req.request_id))
        p.srem(k.requests(), req.request_id)
        self._queued += 2

    def publish_load(self, **figures: int) -> None:
        """Per-worker load figures (running, waiting, blocks, preemptions) that routers read."""
        self._pipe.hset(self.keys.worker_load(self.worker_id), mapping=figures)
        self._queued += 1

    async def flush(self) -> None:
        """Write everything queued since the last flush in one MULTI/EXEC round trip."""
        if not self._queued:
            return
        pipe, self._pipe, self._queued = self._pipe, self.r.pipeline(transaction=True), 0
        await pipe.execute()
