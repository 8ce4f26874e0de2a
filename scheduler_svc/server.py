"""The scheduler process: Submit/Abort for routers, one step loop per worker, state in Redis.

Start: ``python -m scheduler_svc.server --redis-url URL --workers HOST:PORT[,...]`` (or no
``--workers`` and ``--model-name``: workers are found in the Redis registry).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
import redis.asyncio as aioredis

from pagewire import config as pwconfig
from pagewire import serving
from pagewire.redis_keys import RedisKeys
from pagewire.sampling import SamplingParams
from pagewire.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from scheduler_svc.engine import WorkerEngine
from scheduler_svc.request import Request
from scheduler_svc.state_store import StateStore

log = logging.getLogger("scheduler")
SERVICE = "pagewire.v1.Scheduler"


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, cfg: pwconfig.SchedulerConfig) -> None:
        self.cfg = cfg
        self.engines: dict[str, WorkerEngine] = {}
        self.requests: dict[str, tuple[Request, WorkerEngine]] = {}

    def _pick(self, worker_id: str) -> WorkerEngine | None:
        if worker_id in self.engines:
            return self.engines[worker_id]
        if not self.engines:
            return None
        return min(self.engines.values(), key=lambda e: e.scheduler.load_tokens())

    async def Submit(
        self, request: scheduler_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.TokenEvent]:
        rid = request.request_id
        if not rid or not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id and prompt_token_ids are required")
        if rid in self.requests:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is in flight")
        engine = self._pick(request.worker_id)
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker available")
            return
        if len(engine.scheduler.waiting) >= self.cfg.max_queue:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"queue full: {self.cfg.max_queue} requests waiting (--max-queue)",
            )
        params = SamplingParams.from_proto(request.sampling)
        if len(request.prompt_token_ids) + params.max_tokens > engine.info.max_model_len:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_tokens: prompt + max_tokens must be <= {engine.info.max_model_len}",
            )
        total = len(request.prompt_token_ids) + params.max_tokens
        need = -(-total // engine.info.block_size)
        if need > engine.info.num_blocks:  # could never run, even alone: preemption cannot help
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_tokens: prompt + max_tokens ({total} tokens) needs {need} KV blocks; "
                f"worker {engine.worker_id} has {engine.info.num_blocks}",
            )
        req = Request(rid, list(request.prompt_token_ids), params, priority=request.priority)
        self.requests[rid] = (req, engine)
        engine.submit(req)
        try:
            while (event := await req.events.get()) is not None:
                yield event
        finally:
            self.requests.pop(rid, None)
            if not req.finished:  # the client went away: free its blocks in the next step
                engine.abort(req)

    async def Abort(
        self, request: scheduler_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.AbortResponse:
        entry = self.requests.get(request.request_id)
        if entry is None:
            return scheduler_pb2.AbortResponse(found=False)
        req, engine = entry
        engine.abort(req)
        return scheduler_pb2.AbortResponse(found=True)


async def discover_workers(cfg: pwconfig.SchedulerConfig, r: aioredis.Redis) -> list[str]:
    """Worker addresses from --workers, else the live entries of the Redis registry."""
    if cfg.workers:
        return [w.strip() for w in cfg.workers.split(",") if w.strip()]
    if not cfg.model_name:
        raise SystemExit("either --workers or --model-name (to read the Redis registry) is required")
    keys = RedisKeys(cfg.deployment, cfg.model_name)
    ids = [i.decode() for i in await r.smembers(keys.workers())]
    alive = await r.mget([keys.worker_alive(i) for i in ids]) if ids else []
    return [a.decode() for a in alive if a]


async def describe(address: str, timeout: float = 120.0) -> worker_pb2.WorkerInfo:
    await serving.wait_healthy(address, timeout)
    async with serving.insecure_channel(address) as ch:
        return await worker_pb2_grpc.WorkerStub(ch).Describe(worker_pb2.DescribeRequest(), timeout=10)


async def attach_worker(
    service: SchedulerService, cfg: pwconfig.SchedulerConfig, r: aioredis.Redis, address: str
) -> asyncio.Task[None]:
    info = await describe(address)
    model = cfg.model_name or info.model
    store = StateStore(r, RedisKeys(cfg.deployment, model), info.worker_id)
    await store.init_pool(info.num_blocks)
    engine = WorkerEngine(address, info, store, cfg.max_num_seqs, cfg.max_num_batched_tokens)
    service.engines[info.worker_id] = engine
    log.info("attached worker %s at %s (%d blocks)", info.worker_id, address, info.num_blocks)
    return asyncio.create_task(engine.run(), name=f"engine-{info.worker_id}")


async def serve(cfg: pwconfig.SchedulerConfig) -> None:
    if not cfg.redis_url:
        raise SystemExit("--redis-url (or REDIS_URL) is required: Redis is the state of record")
    r = aioredis.Redis.from_url(cfg.redis_url)
    await r.ping()
    service = SchedulerService(cfg)
    server, health_servicer = serving.new_server([SERVICE])
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    await server.start()
    tasks = [await attach_worker(service, cfg, r, a) for a in await discover_workers(cfg, r)]
    await serving.set_serving(health_servicer, [SERVICE], True)
    log.info("scheduler on %s:%d driving %d worker(s)", cfg.host, port, len(tasks))

    try:
        await serving.run_until_signalled(server, health_servicer, [SERVICE])
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await r.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    cfg = pwconfig.parse(pwconfig.SchedulerConfig, argv, prog="pagewire-scheduler")
    serving.setup_logging(cfg.log_level, "scheduler")
    serving.run_main(lambda: serve(cfg))


if __name__ == "__main__":
    main()
