"""The scheduler process: a Connect stream per router, one step loop per worker, state in Redis.

Start: ``python -m scheduler_svc.server --redis-url URL --workers HOST:PORT[,...]`` (or no
``--workers`` and ``--model-name``: workers are found in the Redis registry).

This file is the process's life: connect to Redis, take the group's lease, find and attach the
workers (``discovery``), start their step loops and health watches, publish the group, serve
``connect.SchedulerService`` until SIGTERM, drain, and let go of everything.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Sequence

from pagewire import config as pwconfig
from pagewire import guarded_service, logs, metrics, redis_client, serving, tracing
from pagewire.group_directory import publish_group
from pagewire.redis_client import Client
from pagewire.redis_keys import RedisKeys
from pagewire.store_outage import STORE_DOWN
from pagewire.tls import TLSFiles
from pagewire.v1 import scheduler_pb2, worker_pb2
from scheduler_svc.connect import SchedulerService
from scheduler_svc.discovery import Probe, attach_worker, discover_workers, model_of, probe_all
from scheduler_svc.lease import Lease, LeaseLost
from scheduler_svc.step_loop import WorkerEngine
from scheduler_svc.store_health import watch_store
from scheduler_svc.worker_health import WORKER_SERVICE, watch_health

log = logging.getLogger("scheduler")
SERVICE = "pagewire.v1.Scheduler"


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
    await _attach_all(service, cfg, r, tls, sm, tasks, probes)
    service.ready = True
    # Routers that find schedulers in Redis send work here from now on (and re-attach the
    # group's requests in flight, if this scheduler took the group over).
    address = cfg.advertise or f"{cfg.host}:{port}"
    tasks.append(asyncio.create_task(_publish(r, keys, cfg.group, lease, address,
                                               service.fleet.engines)))
    await serving.set_serving(health_servicer, [SERVICE], True)
    tasks.append(asyncio.create_task(watch_store(
        r, cfg.store_timeout_s, functools.partial(serving.set_serving, health_servicer, [SERVICE]),
        lambda: service.draining)))
    log.info("scheduler on %s:%d driving %d worker(s) of group %s", cfg.host, port,
             len(service.fleet.engines), cfg.group)

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


async def _attach_all(
    service: SchedulerService,
    cfg: pwconfig.SchedulerConfig,
    r: Client,
    tls: TLSFiles | None,
    sm: metrics.SchedulerMetrics,
    tasks: list[asyncio.Task],
    probes: dict[str, Probe],
) -> None:
    """Attach every worker found: at once those that describe themselves (draining ones hand
    their recovered requests to the others), in the background those still loading. Returns
    once one worker is attached (or none was found)."""
    attach = functools.partial(_attach, service, cfg, r, tls, sm, tasks)
    loading = []
    for address, found in probes.items():
        if found is None:  # still loading (or away): attached in the background once it serves
            task = asyncio.create_task(attach(address))
            task.add_done_callback(functools.partial(_log_failed_attach, address))
            loading.append(task)
        else:
            await attach(address, *found)
    tasks += loading
    await service.fleet.evacuate_draining()
    if loading and not service.fleet.engines:  # nothing to serve with yet: wait for the first one
        await asyncio.wait(loading, return_when=asyncio.FIRST_COMPLETED)


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
    engine, recovered = await attach_worker(service.fleet, cfg, r, address, tls, sm, info)
    engine.set_draining(not serves)
    tasks.append(asyncio.create_task(engine.run(r, cfg.heartbeat_check_s)))
    tasks.append(asyncio.create_task(watch_health(
        address, tls, functools.partial(service.fleet.set_serving, engine))))
    if recovered:
        tasks.append(asyncio.create_task(service.reap_orphans(recovered)))


def _log_failed_attach(address: str, task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("worker %s could not be attached: %r", address, task.exception())


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
