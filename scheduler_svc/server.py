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
from scheduler_svc.request import Request, Status
from scheduler_svc.scheduler import SchedulerLimits
from scheduler_svc.state_store import StateStore

log = logging.getLogger("scheduler")
SERVICE = "pagewire.v1.Scheduler"


ORPHAN_TIMEOUT_S = 60.0  # a recovered request no router re-attaches to within this is aborted


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, cfg: pwconfig.SchedulerConfig) -> None:
        self.cfg = cfg
        self.engines: dict[str, WorkerEngine] = {}
        self.requests: dict[str, Request] = {}
        self.placement: dict[str, WorkerEngine] = {}  # request id -> engine running it
        self.stores: list[StateStore] = []
        self.ready = False

    # ---- placement -----------------------------------------------------------------------
    def _pick(self, worker_id: str, exclude: WorkerEngine | None = None) -> WorkerEngine | None:
        candidates = [e for e in self.engines.values() if e is not exclude]
        if not candidates:
            return None
        chosen = self.engines.get(worker_id)
        if chosen is not None and chosen is not exclude and chosen.connected:
            return chosen
        return min(candidates, key=lambda e: e.load())

    def place(self, req: Request, engine: WorkerEngine) -> None:
        self.placement[req.request_id] = engine
        engine.submit(req)

    def on_worker_lost(self, lost: WorkerEngine, reqs: list[Request]) -> None:
        """Recompute a lost worker's requests (prompt + output so far) on the others."""
        for req in reqs:
            target = self._pick("", exclude=lost) or lost
            self.place(req, target)
        if reqs:
            log.warning("moved %d requests off worker %s", len(reqs), lost.worker_id)

    # ---- the API -------------------------------------------------------------------------
    async def Submit(
        self, request: scheduler_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.TokenEvent]:
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler is starting")
        if request.resume:
            req = await self._resume(request, context)
        else:
            req = await self._admit(request, context)
        if req is None:
            return
        try:
            while (event := await req.events.get()) is not None:
                yield event
        finally:
            if self.requests.get(req.request_id) is req:
                del self.requests[req.request_id]
            engine = self.placement.pop(req.request_id, None)
            if engine is not None and not req.finished:  # the client went away: free its blocks
                engine.abort(req)

    async def _admit(
        self, request: scheduler_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> Request | None:
        rid = request.request_id
        if not rid or not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id and prompt_token_ids are required")
        if rid in self.requests:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is in flight")
        engine = self._pick(request.worker_id)
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker available")
            return None
        if len(engine.scheduler.waiting) >= self.cfg.max_queue:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"queue full: {self.cfg.max_queue} requests waiting (--max-queue)",
            )
        params = SamplingParams.from_proto(request.sampling)
        total = len(request.prompt_token_ids) + params.max_tokens
        if total > engine.info.max_model_len:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_tokens: prompt + max_tokens must be <= {engine.info.max_model_len}",
            )
        need = -(-total // engine.info.block_size)
        if need > engine.info.num_blocks:  # could never run, even alone: preemption cannot help
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_tokens: prompt + max_tokens ({total} tokens) needs {need} KV blocks; "
                f"worker {engine.worker_id} has {engine.info.num_blocks}",
            )
        req = Request(rid, list(request.prompt_token_ids), params, priority=request.priority)
        self.requests[rid] = req
        self.place(req, engine)
        return req

    async def _resume(
        self, request: scheduler_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> Request | None:
        """Re-attach a stream: replay output from resume_from, then continue live."""
        rid, start = request.request_id, max(request.resume_from, 0)
        req = self.requests.get(rid)
        if req is None:
            stored = await self.stores[0].load_request(rid) if self.stores else None
            if stored is None or not stored[0].finish_reason:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id {rid!r} is not known")
                return None
            done = stored[0]
            req = Request(rid, done.prompt, done.params, output=done.output,
                          finish_reason=done.finish_reason, num_cached=done.num_cached)
            req.status = Status.FINISHED
            req.sent = req.flushed = len(req.output)
        req.events = asyncio.Queue()
        req.events.put_nowait(
            scheduler_pb2.TokenEvent(
                request_id=rid,
                token_ids=req.output[start : req.flushed],
                index=start,
                finish_reason=req.finish_reason,
                prompt_tokens=len(req.prompt),
                cached_tokens=max(req.num_cached, 0),
            )
        )
        req.sent = req.flushed
        req.attached = True
        if req.finished:
            req.events.put_nowait(None)
        return req

    async def Abort(
        self, request: scheduler_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.AbortResponse:
        req = self.requests.get(request.request_id)
        engine = self.placement.get(request.request_id)
        if req is None or engine is None:
            return scheduler_pb2.AbortResponse(found=False)
        engine.abort(req)
        return scheduler_pb2.AbortResponse(found=True)

    async def reap_orphans(self, recovered: list[Request]) -> None:
        """Abort recovered requests that no router re-attached to in time."""
        await asyncio.sleep(ORPHAN_TIMEOUT_S)
        for req in recovered:
            engine = self.placement.get(req.request_id)
            if not req.attached and not req.finished and engine is not None:
                log.warning("aborting %s: no router resumed it", req.request_id)
                engine.abort(req)
                self.requests.pop(req.request_id, None)
                self.placement.pop(req.request_id, None)


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
) -> tuple[WorkerEngine, list[Request]]:
    """Describe the worker, reload what Redis holds for it, and make its engine."""
    info = await describe(address)
    model = cfg.model_name or info.model
    store = StateStore(r, RedisKeys(cfg.deployment, model), info.worker_id)
    limits = SchedulerLimits(
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        block_size=info.block_size,
        max_model_len=info.max_model_len,
        eos_token_ids=tuple(info.eos_token_ids),
        prefix_caching=cfg.prefix_caching,
        priority_aging_s=cfg.priority_aging_s,
    )
    engine = WorkerEngine(address, info, store, limits, service.on_worker_lost)
    engine.check_invariants = cfg.check_invariants
    recovered = await engine.recover(await store.load())
    for req in recovered:
        service.requests[req.request_id] = req
        service.placement[req.request_id] = engine
    service.engines[info.worker_id] = engine
    service.stores.append(store)
    log.info("attached worker %s at %s (%d blocks, %d requests recovered)",
             info.worker_id, address, info.num_blocks, len(recovered))
    return engine, recovered


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
    tasks, recovered = [], []
    for address in await discover_workers(cfg, r):
        engine, reqs = await attach_worker(service, cfg, r, address)
        recovered += reqs
        tasks.append(asyncio.create_task(engine.run(r, cfg.heartbeat_check_s)))
    if recovered:
        tasks.append(asyncio.create_task(service.reap_orphans(recovered)))
    service.ready = True
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
