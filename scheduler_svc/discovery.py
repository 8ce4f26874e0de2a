"""Finding the group's workers and attaching them: from --workers or the Redis registry, probed
once at start-up, each made an engine with what Redis holds for it."""

from __future__ import annotations

import asyncio
import logging

from pagewire import config as pwconfig
from pagewire import metrics, serving
from pagewire.redis_client import Client
from pagewire.redis_keys import RedisKeys
from pagewire.tls import TLSFiles
from pagewire.v1 import worker_pb2, worker_pb2_grpc
from pagewire.worker_registry import live_addresses
from scheduler_svc.fleet import Fleet
from scheduler_svc.request import Request
from scheduler_svc.scheduler import SchedulerLimits
from scheduler_svc.state_store import StateStore
from scheduler_svc.step_loop import WorkerEngine
from scheduler_svc.worker_health import probe

log = logging.getLogger("scheduler")

Probe = tuple[worker_pb2.WorkerInfo, bool] | None  # what worker_health.probe found


async def discover_workers(cfg: pwconfig.SchedulerConfig, r: Client) -> list[str]:
    """Worker addresses from --workers, else the live entries of the Redis registry that joined
    this scheduler's --group (a worker registered without a group is in ``default``)."""
    if cfg.workers:
        return [w.strip() for w in cfg.workers.split(",") if w.strip()]
    if not cfg.model_name:
        raise SystemExit("either --workers or --model-name (to read the Redis registry) is required")
    return await live_addresses(r, RedisKeys(cfg.deployment, cfg.model_name), cfg.group)


async def describe(address: str, tls: TLSFiles | None, timeout: float = 120.0) -> worker_pb2.WorkerInfo:
    await serving.wait_healthy(address, timeout, tls=tls)
    async with serving.open_channel(address, tls) as ch:
        return await worker_pb2_grpc.WorkerStub(ch).Describe(worker_pb2.DescribeRequest(), timeout=10)


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


def limits_for(cfg: pwconfig.SchedulerConfig, info: worker_pb2.WorkerInfo) -> SchedulerLimits:
    return SchedulerLimits(
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        block_size=info.block_size,
        max_model_len=info.max_model_len,
        eos_token_ids=tuple(info.eos_token_ids),
        prefix_caching=cfg.prefix_caching,
        priority_aging_s=cfg.priority_aging_s,
        max_encoder_tokens=cfg.max_encoder_tokens,
    )


async def attach_worker(
    fleet: Fleet,
    cfg: pwconfig.SchedulerConfig,
    r: Client,
    address: str,
    tls: TLSFiles | None,
    sm: metrics.SchedulerMetrics,
    info: worker_pb2.WorkerInfo | None = None,
) -> tuple[WorkerEngine, list[Request]]:
    """Reload what Redis holds for the worker (described by ``info``, else asked once it
    serves), make its engine and add it to the fleet."""
    info = info or await describe(address, tls)
    model = cfg.model_name or info.model
    store = StateStore(r, RedisKeys(cfg.deployment, model), info.worker_id)
    engine = WorkerEngine(address, info, store, limits_for(cfg, info), fleet, tls=tls, metrics=sm)
    engine.check_invariants = cfg.check_invariants
    # Held steps (step_clock) are for workers whose launch is the whole computation, where they
    # were measured; a GPU worker launches a step's host work while the previous one computes,
    # so it gets each step as soon as it may go.
    engine.step_clock.lead_s = cfg.step_lead_ms / 1e3 if info.device == "cpu" else -1.0
    engine.hold_after_first_token = cfg.hold_after_first_token and info.device == "cpu"
    engine.join_new_requests = cfg.join_new_requests and info.device == "cpu"
    recovered = await engine.recover(await store.load())
    fleet.adopt(engine, recovered)
    log.info("attached worker %s at %s (%d blocks, %d requests recovered with %d output tokens)",
             info.worker_id, address, info.num_blocks, len(recovered),
             sum(len(r.output) for r in recovered))
    return engine, recovered
