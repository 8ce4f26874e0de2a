"""The scheduler process: a Connect stream per router, one step loop per worker, state in Redis.

Start: ``python -m scheduler_svc.server --redis-url URL --workers HOST:PORT[,...]`` (or no
``--workers`` and ``--model-name``: workers are found in the Redis registry).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Sequence

import grpc

from pagewire import config as pwconfig
from pagewire import guarded_service, logs, metrics, redis_client, serving, tracing
from pagewire.group_directory import publish_group
from pagewire.redis_client import STORE_DOWN, Client
from pagewire.redis_keys import RedisKeys
from pagewire.sampling import SamplingParams
from pagewire.tls import TLSFiles
from pagewire.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from scheduler_svc import images
from scheduler_svc.engine import WorkerEngine
from scheduler_svc.lease import Lease, LeaseLost
from scheduler_svc.request import Request, RouterConn, Status
from scheduler_svc.scheduler import SchedulerLimits
from scheduler_svc.state_store import StateStore
from scheduler_svc.store_health import watch_store
from scheduler_svc.worker_health import WORKER_SERVICE, probe, watch_health

log = logging.getLogger("scheduler")
SERVICE = "pagewire.v1.Scheduler"


ORPHAN_TIMEOUT_S = 60.0  # a recovered request no router re-attaches to within this is aborted


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, cfg: pwconfig.SchedulerConfig) -> None:
        self.cfg = cfg
        self.engines: dict[str, WorkerEngine] = {}
        self.requests: dict[str, Request] = {}
        self.placement: dict[str, WorkerEngine] = {}  # request id -> engine running it
        self.ready = False
        self.draining = False

    async def drain(self) -> None:
        """SIGTERM: refuse new requests, let the ones in flight finish."""
        self.draining = True
        while self.requests:
            await asyncio.sleep(0.1)
        for engine in self.engines.values():
            await engine.settle()

    # ---- placement -----------------------------------------------------------------------
    def _pick(self, worker_id: str, exclude: WorkerEngine | None = None) -> WorkerEngine | None:
        """The router's choice if it takes new work, else the least loaded worker that does.
        None when every worker (but ``exclude``) is draining: none of them may get new work."""
        candidates = [e for e in self.engines.values() if e is not exclude and not e.draining]
        if not candidates:
            return None
        chosen = self.engines.get(worker_id)
        if chosen in candidates and chosen.connected:
            return chosen
        return min(candidates, key=lambda e: e.load())

    def on_worker_health(self, engine: WorkerEngine, serving: bool) -> None:
        """The worker's health status changed (``worker_health``): a worker that is not SERVING
        is draining and gets no new requests; its engine hands its unstarted ones over."""
        if engine.draining == (not serving):
            return
        engine.draining = not serving
        engine.wakeup.set()  # publish the flag for routers, hand waiting requests over
        if engine.draining:
            log.warning("worker %s is not serving (draining or starting): no new requests go to it",
                        engine.worker_id)
        else:
            log.info("worker %s is serving: it takes new requests", engine.worker_id)

    def on_draining(self, engine: WorkerEngine) -> Awaitable[None] | None:
        """A draining worker has waiting requests that never started: the hand-over that moves
        them to the workers that take new work, or None when no such worker is connected -- then
        they stay and run there, within its drain timeout (they were accepted, and the worker is
        still computing). The engine runs the hand-over at a step boundary."""
        if not any(e.connected and not e.draining for e in self.engines.values() if e is not engine):
            return None
        return self._hand_over(engine)

    async def _hand_over(self, engine: WorkerEngine) -> None:
        moved = engine.scheduler.take_unstarted()
        if not moved:
            return
        await engine.release(moved)
        placed = 0
        for req in moved:
            if req.finished:  # aborted while its release was written
                continue
            self.place(req, self._pick("", exclude=engine) or engine)
            placed += 1
        log.warning("worker %s is draining: moved %d waiting requests to other workers",
                    engine.worker_id, placed)

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

    def on_done(self, req: Request) -> None:
        """A request finished or was aborted: forget it (its events were sent already)."""
        if self.requests.get(req.request_id) is req:
            del self.requests[req.request_id]
        self.placement.pop(req.request_id, None)
        if req.conn is not None:
            req.conn.requests.pop(req.request_id, None)

    # ---- the API -------------------------------------------------------------------------
    async def Connect(
        self, request_iterator: AsyncIterator[scheduler_pb2.RouterMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.EventBatch]:
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler is starting")
        await context.send_initial_metadata(())  # tells the router the stream is accepted
        conn = RouterConn()
        reader = asyncio.create_task(self._read_router(request_iterator, conn))
        reader.add_done_callback(lambda _: conn.ready.set())  # wakes the loop below to end
        try:
            while True:
                if conn.pending:
                    yield conn.take()  # clears ready
                elif reader.done():
                    break
                else:
                    conn.ready.clear()
                    await conn.ready.wait()
        finally:
            reader.cancel()
            for req in list(conn.requests.values()):  # the router went away: free their blocks
                req.conn = None
                engine = self.placement.get(req.request_id)
                if engine is not None and not req.finished:
                    engine.abort(req)

    async def _read_router(
        self, messages: AsyncIterator[scheduler_pb2.RouterMessage], conn: RouterConn
    ) -> None:
        async for msg in messages:
            if msg.HasField("submit"):
                sub = msg.submit
                error = await self._resume(sub, conn) if sub.resume else self._admit(sub, conn)
                if error is not None:
                    code, text = error
                    conn.send(scheduler_pb2.TokenEvent(
                        request_id=sub.request_id, error_code=code.value[0], error_message=text,
                    ))
            elif msg.HasField("abort"):
                self._abort(msg.abort.request_id, conn)

    def _admit(self, sub: scheduler_pb2.SubmitRequest, conn: RouterConn) -> tuple[grpc.StatusCode, str] | None:
        rid = sub.request_id
        if not rid or not sub.prompt_token_ids:
            return grpc.StatusCode.INVALID_ARGUMENT, "request_id and prompt_token_ids are required"
        if rid in self.requests:
            return grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is in flight"
        if self.draining:
            return grpc.StatusCode.UNAVAILABLE, "scheduler is shutting down"
        engine = self._pick(sub.worker_id)
        if engine is None and self.engines:
            # Queueing for a worker that is leaving would hold the client for an unknown time
            # (it may never come back); UNAVAILABLE is the status clients retry, and nothing ran.
            return (grpc.StatusCode.UNAVAILABLE,
                    f"every worker of group {self.cfg.group!r} is draining (shutting down or "
                    "starting): no new requests until one serves again; retry")
        if engine is None:
            return grpc.StatusCode.UNAVAILABLE, "no worker available"
        if len(engine.scheduler.waiting) >= self.cfg.max_queue:
            return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"queue full: {self.cfg.max_queue} requests waiting (--max-queue)")
        params = SamplingParams.from_proto(sub.sampling)
        total = len(sub.prompt_token_ids) + params.max_tokens
        if total > engine.info.max_model_len:
            return (grpc.StatusCode.INVALID_ARGUMENT,
                    f"max_tokens: prompt + max_tokens must be <= {engine.info.max_model_len}")
        need = -(-total // engine.info.block_size)
        if need > engine.info.num_blocks:  # could never run, even alone: preemption cannot help
            return (grpc.StatusCode.INVALID_ARGUMENT,
                    f"max_tokens: prompt + max_tokens ({total} tokens) needs {need} KV blocks; "
                    f"worker {engine.worker_id} has {engine.info.num_blocks}")
        if sub.pooling != common_pb2.POOLING_NONE:
            params = dataclasses.replace(params, max_tokens=1)  # runs its prompt, samples nothing
        if bad := images.check(sub.images, len(sub.prompt_token_ids)):
            return grpc.StatusCode.INVALID_ARGUMENT, bad
        req = Request(rid, list(sub.prompt_token_ids), params, priority=sub.priority, conn=conn,
                      pooling=sub.pooling, trace_context=dict(sub.trace_context),
                      images=list(sub.images), cache_salt=sub.cache_salt)
        self.requests[rid] = req
        conn.requests[rid] = req
        self.place(req, engine)
        return None

    async def _resume(
        self, sub: scheduler_pb2.SubmitRequest, conn: RouterConn
    ) -> tuple[grpc.StatusCode, str] | None:
        """Re-attach a request recovered after a restart: replay from resume_from, then live.

        A request that finished just before the restart (its last events possibly unsent) is
        replayed from Redis, where its output outlives it for a while.
        """
        rid, start = sub.request_id, max(sub.resume_from, 0)
        req = self.requests.get(rid)
        if req is None:
            req = await self._finished_request(rid)
            if req is None:
                return grpc.StatusCode.NOT_FOUND, f"request_id {rid!r} is not in flight"
        else:
            req.conn = conn
            conn.requests[rid] = req
        conn.send(
            scheduler_pb2.TokenEvent(
                request_id=rid,
                token_ids=req.output[start : req.flushed],
                index=start,
                finish_reason=req.finish_reason,
                prompt_tokens=len(req.prompt),
                cached_tokens=max(req.num_cached, 0),
            )
        )
        return None

    async def _finished_request(self, rid: str) -> Request | None:
        engine = next(iter(self.engines.values()), None)
        stored = await engine.store.load_request(rid) if engine is not None else None
        if stored is None or not stored[0].finish_reason:
            return None
        done = stored[0]
        req = Request(rid, done.prompt, done.params, output=done.output,
                      finish_reason=done.finish_reason, num_cached=done.num_cached,
                      status=Status.FINISHED)
        req.sent = req.queued = req.flushed = len(req.output)
        return req

    def _abort(self, rid: str, conn: RouterConn | None = None) -> bool:
        """Abort ``rid``. Over a Connect stream (``conn``), only the stream that owns the request
        (or any, while a recovered request has no owner yet) may: a router that sent a duplicate
        id and was refused aborts that id, and must not end the first request."""
        req, engine = self.requests.get(rid), self.placement.get(rid)
        if req is None or engine is None:
            return False
        if conn is not None and req.conn is not None and req.conn is not conn:
            return False
        req.conn = None  # the router no longer wants its events
        engine.abort(req)
        return True

    async def Abort(
        self, request: scheduler_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.AbortResponse:
        return scheduler_pb2.AbortResponse(found=self._abort(request.request_id))

    async def reap_orphans(self, recovered: list[Request]) -> None:
        """Abort recovered requests that no router re-attached to in time."""
        await asyncio.sleep(ORPHAN_TIMEOUT_S)
        for req in recovered:
            if req.conn is None and not req.finished:
                log.warning("aborting %s: no router resumed it", req.request_id)
                self._abort(req.request_id)


async def discover_workers(cfg: pwconfig.SchedulerConfig, r: Client) -> list[str]:
    """Worker addresses from --workers, else the live entries of the Redis registry that joined
    this scheduler's --group (a worker registered without a group is in ``default``)."""
    if cfg.workers:
        return [w.strip() for w in cfg.workers.split(",") if w.strip()]
    if not cfg.model_name:
        raise SystemExit("either --workers or --model-name (to read the Redis registry) is required")
    keys = RedisKeys(cfg.deployment, cfg.model_name)
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
        if a and (g.decode() if g else "default") == cfg.group
    ]


async def describe(address: str, tls: TLSFiles | None, timeout: float = 120.0) -> worker_pb2.WorkerInfo:
    await serving.wait_healthy(address, timeout, tls=tls)
    async with serving.open_channel(address, tls) as ch:
        return await worker_pb2_grpc.WorkerStub(ch).Describe(worker_pb2.DescribeRequest(), timeout=10)


Probe = tuple[worker_pb2.WorkerInfo, bool] | None  # what worker_health.probe found


async def probe_all(addresses: list[str], tls: TLSFiles | None) -> dict[str, Probe]:
    """Every worker probed once, all at the same time."""
    found = await asyncio.gather(*(probe(a, tls) for a in addresses))
    return dict(zip(addresses, found, strict=True))


async def model_of(probes: dict[str, Probe], tls: TLSFiles | None) -> str:
    """The model of the first worker that describes itself (draining or not): the group's. While
    none can (all still loading), ask again."""
    while True:
        for found in probes.values():
            if found is not None:
                return found[0].model
        await asyncio.sleep(0.5)
        probes = await probe_all(list(probes), tls)


async def attach_worker(
    service: SchedulerService,
    cfg: pwconfig.SchedulerConfig,
    r: Client,
    address: str,
    tls: TLSFiles | None,
    sm: metrics.SchedulerMetrics,
    info: worker_pb2.WorkerInfo | None = None,
) -> tuple[WorkerEngine, list[Request]]:
    """Reload what Redis holds for the worker (described by ``info``, else asked once it
    serves), and make its engine."""
    info = info or await describe(address, tls)
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
        max_encoder_tokens=cfg.max_encoder_tokens,
    )
    engine = WorkerEngine(address, info, store, limits, service.on_worker_lost, service.on_done,
                          tls=tls, metrics=sm,
                          on_draining=service.on_draining)
    engine.check_invariants = cfg.check_invariants
    recovered = await engine.recover(await store.load())
    for req in recovered:
        service.requests[req.request_id] = req
        service.placement[req.request_id] = engine
    service.engines[info.worker_id] = engine
    log.info("attached worker %s at %s (%d blocks, %d requests recovered with %d output tokens)",
             info.worker_id, address, info.num_blocks, len(recovered),
             sum(len(r.output) for r in recovered))
    return engine, recovered


async def serve(cfg: pwconfig.SchedulerConfig) -> None:
    if not cfg.redis_url:
        raise SystemExit("--redis-url (or REDIS_URL) is required: Redis is the state of record")
    r = await redis_client.connect_or_exit(cfg.redis_url, "scheduler")
    tls = TLSFiles.from_config(cfg)
    service = SchedulerService(cfg)
    server, health_servicer = serving.new_server([SERVICE])
    guarded_service.add_service(server, scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"], service)
    port = serving.add_port(server, f"{cfg.host}:{cfg.port}", tls)
    await server.start()
    addresses = await discover_workers(cfg, r)
    probes = await probe_all(addresses, tls)
    keys = RedisKeys(cfg.deployment, cfg.model_name or (
        await model_of(probes, tls) if addresses else "none"))
    registry = metrics.new_registry()
    sm = metrics.scheduler_metrics(registry, keys.model)
    metrics_server = metrics.serve_metrics(cfg.metrics_port, registry, cfg.host)
    if metrics_server.port >= 0:
        log.info("metrics on http://%s:%d/metrics", cfg.host, metrics_server.port)
    # Before touching the group's state: a second scheduler (rollout, standby) waits here.
    lease = Lease(r, keys.scheduler_lease(cfg.group), cfg.lease_ttl_s)
    await lease.acquire()
    tasks = [asyncio.create_task(_hold(lease))]
    attach = functools.partial(_attach, service, cfg, r, tls, sm, tasks)
    loading = []
    for address in addresses:
        found = probes[address]
        if found is None:  # still loading (or away): attached in the background once it serves
            task = asyncio.create_task(attach(address))
            task.add_done_callback(functools.partial(_log_failed_attach, address))
            loading.append(task)
        else:
            await attach(address, *found)
    tasks += loading
    await _evacuate_draining(service)
    if loading and not service.engines:  # nothing to serve with yet: wait for the first one
        await asyncio.wait(loading, return_when=asyncio.FIRST_COMPLETED)
    service.ready = True
    # Routers that find schedulers in Redis send work here from now on (and re-attach the
    # group's requests in flight, if this scheduler took the group over).
    address = cfg.advertise or f"{cfg.host}:{port}"
    tasks.append(asyncio.create_task(_publish(r, keys, cfg.group, lease, address, service.engines)))
    await serving.set_serving(health_servicer, [SERVICE], True)
    tasks.append(asyncio.create_task(watch_store(
        r, cfg.store_timeout_s, functools.partial(serving.set_serving, health_servicer, [SERVICE]),
        lambda: service.draining)))
    log.info("scheduler on %s:%d driving %d worker(s) of group %s", cfg.host, port,
             len(service.engines), cfg.group)

    try:
        await serving.run_until_signalled(server, health_servicer, [SERVICE], drain=service.drain,
                                          drain_timeout_s=cfg.drain_timeout_s)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await lease.release()
        await r.aclose()
        metrics_server.stop()
        tracing.shutdown_tracing()


async def _attach(
    service: SchedulerService,
    cfg: pwconfig.SchedulerConfig,
    r: Client,
    tls: TLSFiles | None,
    sm: metrics.SchedulerMetrics,
    tasks: list[asyncio.Task],
    address: str,
    info: worker_pb2.WorkerInfo | None = None,
    serves: bool = True,
) -> None:
    """Attach the worker and drive it (step loop, health watch). Without ``info`` it is still
    loading: wait as long as it takes for it to serve. ``serves`` False: it was found draining,
    and takes no new requests."""
    if info is None:
        await serving.wait_healthy(address, float("inf"), WORKER_SERVICE, tls)
    engine, recovered = await attach_worker(service, cfg, r, address, tls, sm, info)
    engine.draining = not serves
    tasks.append(asyncio.create_task(engine.run(r, cfg.heartbeat_check_s)))
    tasks.append(asyncio.create_task(watch_health(
        address, tls, functools.partial(service.on_worker_health, engine))))
    if recovered:
        tasks.append(asyncio.create_task(service.reap_orphans(recovered)))


def _log_failed_attach(address: str, task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("worker %s could not be attached: %r", address, task.exception())


async def _evacuate_draining(service: SchedulerService) -> None:
    """Workers found draining at start-up hand their recovered requests to the serving ones,
    which recompute them (prompt + output so far) as after a worker loss: the first stream this
    scheduler opens to a worker resets its sequences, so a draining one would exit with them.
    With no worker serving they stay, and run there while it lasts."""
    if all(e.draining for e in service.engines.values()):
        return
    for engine in list(service.engines.values()):
        if engine.draining:
            log.warning("worker %s is draining at start-up: its %d recovered requests recompute "
                        "on the workers that serve", engine.worker_id,
                        len(engine.scheduler.running) + len(engine.scheduler.waiting))
            await engine.evacuate()


async def _hold(lease: Lease) -> None:
    """Renew the lease; losing it means another scheduler may be driving the group: stop now."""
    try:
        await lease.keep()
    except LeaseLost:
        log.critical("lost the scheduler lease %s: exiting", lease.key)
        os._exit(75)


async def _publish(
    r: Client, keys: RedisKeys, group: str, lease: Lease, address: str,
    engines: dict[str, WorkerEngine],
) -> None:
    """Keep the group's directory entry in Redis at every lease renewal (so it is back soon
    after Redis restarts empty, and names workers attached late); the entry is written only while
    the lease is ours."""
    while True:
        try:
            await publish_group(r, keys, group, lease.token, address, list(engines))
        except STORE_DOWN:
            pass  # Redis is away: the next round writes it
        await asyncio.sleep(lease.ttl_ms / 3000)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = pwconfig.parse(pwconfig.SchedulerConfig, argv, prog="pagewire-scheduler")
    logs.setup_logging(cfg.log_level, "scheduler", cfg.log_format)
    tracing.init_tracing("pagewire-scheduler")
    serving.run_main(lambda: serve(cfg))


if __name__ == "__main__":
    main()
