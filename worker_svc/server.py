"""The worker process: loads the model, owns the KV memory, executes steps over a gRPC stream.

Start: ``python -m worker_svc.server --model DIR --port P [--redis-url URL]``. With Redis it
registers itself (``pagewire.worker_registry``) so schedulers can find it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import torch

import kernels
from pagewire import config as pwconfig
from pagewire import guarded_service, logs, metrics, redis_client, serving, tracing, worker_registry
from pagewire.redis_keys import RedisKeys
from pagewire.store_outage import STORE_DOWN, STORE_ERRORS
from pagewire.tls import TLSFiles
from pagewire.v1 import worker_pb2, worker_pb2_grpc
from pagewire.worker_registry import WorkerEntry
from worker_svc import compute_thread, cpu_heap
from worker_svc.constraints import Constraints
from worker_svc.cuda_graphs import DecodeGraphs
from worker_svc.loader import load_model, read_model_dir, resolve_dtype
from worker_svc.models import decode_layers
from worker_svc.models.packed_linear import (
    WIDEN_FROM_ROWS,
    WidenedLinear,
    can_pack,
    pack_linears,
    warm,
    widens,
)
from worker_svc.runner import ModelRunner, PendingStep, allocate_kv_cache, kv_block_bytes
from worker_svc.step_pipeline import StepPipeline

log = logging.getLogger("worker")
SERVICE = "pagewire.v1.Worker"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_runner(cfg: pwconfig.WorkerConfig) -> tuple[ModelRunner, worker_pb2.WorkerInfo]:
    """Load weights, size and allocate the KV cache; describe the result."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    files = read_model_dir(cfg.model)
    device = pick_device(cfg.device)
    if device.type == "cpu":
        cpu_heap.keep_freed_memory()
    # Started first, so its tokenizer load (seconds of Python holding the GIL) overlaps the
    # weights' load rather than the first steps; serve() waits for it before reporting healthy.
    constraints = Constraints(cfg.model, int(files.text_config["vocab_size"]), files.eos_token_ids)
    dtype = resolve_dtype(cfg.dtype, files.hf_config, device)
    max_len = cfg.max_model_len or files.max_position_embeddings
    if max_len > files.max_position_embeddings:  # positions the model was never trained on
        raise SystemExit(f"--max-model-len {max_len} exceeds the model's max_position_embeddings "
                         f"{files.max_position_embeddings} (config.json)")
    model = load_model(files, device, dtype, max_len, cfg.load_format)
    if cfg.packed_weights and can_pack(device, dtype):
        log.info("packed %d projection weights for oneDNN", pack_linears(model))
    elif cfg.packed_weights and widens(device, dtype):
        log.info("bfloat16 on a CPU without bfloat16 kernels: %d projections run their products of "
                 "%d rows or more in float32", pack_linears(model, WidenedLinear), WIDEN_FROM_ROWS)
    block_bytes = kv_block_bytes(model, cfg.block_size, dtype)
    num_blocks = cfg.num_blocks
    if num_blocks <= 0:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = free * cfg.gpu_memory_utilization
        else:
            budget = cfg.kv_cache_gb * (1 << 30)
        num_blocks = max(int(budget // block_bytes), 1)
    backend_name = cfg.attention_backend
    if backend_name == "auto":
        backend_name = kernels.default_backend_name(device)
    backend = kernels.get_backend(backend_name)
    caches = allocate_kv_cache(model, num_blocks, cfg.block_size, dtype, device)
    if device.type == "cpu":
        model.layer_stack = decode_layers.build(model, caches, backend)
    graphs = None
    if cfg.cuda_graphs and device.type == "cuda":
        graphs = DecodeGraphs(model, caches, backend, device, cfg.block_size, max_len,
                              cfg.max_num_seqs)
    runner = ModelRunner(model, caches, cfg.block_size, backend, device, files.eos_token_ids,
                         graphs, constraints)
    info = worker_pb2.WorkerInfo(
        worker_id=cfg.worker_id or f"{cfg.host}:{cfg.port}",
        model=cfg.served_model_name or Path(cfg.model).resolve().name,
        dtype=str(dtype).removeprefix("torch."),
        block_size=cfg.block_size,
        num_blocks=num_blocks,
        max_model_len=max_len,
        vocab_size=model.cfg.vocab_size,
        eos_token_ids=list(files.eos_token_ids),
        attention_backend=backend.name,
        device=str(device),
        instance_id=uuid.uuid4().hex,
    )
    return runner, info


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Registered before the model is loaded (so health answers at once); UNAVAILABLE until then."""

    def __init__(self) -> None:
        self.runner: ModelRunner | None = None
        self.info = worker_pb2.WorkerInfo()
        self.lock = asyncio.Lock()  # one scheduler stream drives the device at a time
        self.metrics: metrics.WorkerMetrics | None = None
        # Trace context of traced sequences (sent once, with `new`), until they are released.
        self.traces: dict[int, dict[str, str]] = {}

    @property
    def num_sequences(self) -> int:
        return len(self.runner.table.rows) if self.runner is not None else 0

    def _trace(self, step: worker_pb2.Step, start_ns: int, end_ns: int) -> None:
        """A span per traced prefill chunk (never per packed decode: their cost must not grow
        with tracing), child of the scheduler's span for the request."""
        for seq_id in step.release_seq_ids:
            self.traces.pop(seq_id, None)
        for s in step.seqs:
            if s.new and s.trace_context:
                self.traces[s.seq_id] = dict(s.trace_context)
            carrier = self.traces.get(s.seq_id)
            if carrier:
                span = tracing.start_child(tracing.WORKER_STEP_SPAN, carrier, {
                    tracing.WORKER_ID: self.info.worker_id,
                    "pagewire.step_id": step.step_id,
                    "pagewire.start_pos": s.start_pos,
                    "pagewire.chunk_tokens": max(len(s.token_ids), 1),
                    "pagewire.batch_sequences": len(step.seqs) + len(step.decodes.seq_ids),
                }, start_time_ns=start_ns)
                tracing.end_span(span, end_time_ns=end_ns)

    async def Describe(
        self, request: worker_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        if self.runner is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is still loading")
        return self.info

    async def Execute(
        self, request_iterator: AsyncIterator[worker_pb2.Step], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.StepResult]:
        runner = self.runner
        if runner is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is still loading")
            return
        async with self.lock:
            runner.reset()
            self.traces.clear()
            pipeline = StepPipeline(runner, on_result=self._observe)
            async for result in pipeline.run(request_iterator):
                yield result

    def _observe(self, pending: PendingStep) -> None:
        """Metrics and spans of a step, from its launch to its result."""
        seconds = time.perf_counter() - pending.started
        if self.metrics is not None:
            self.metrics.observe_step(seconds)
        if tracing.enabled():
            end_ns = time.time_ns()
            self._trace(pending.step, end_ns - int(seconds * 1e9), end_ns)


async def register(
    cfg: pwconfig.WorkerConfig, r: redis_client.Client, info: worker_pb2.WorkerInfo, address: str
) -> None:
    """Register in Redis and keep the heartbeat alive until cancelled. Nothing Redis answers
    ends the heartbeat: an error is logged, and the next beat tries again."""
    keys = RedisKeys(cfg.deployment, info.model)
    ttl_ms = int(cfg.heartbeat_s * 3000)
    entry = WorkerEntry(
        worker_id=info.worker_id, address=address, model=info.model, block_size=info.block_size,
        num_blocks=info.num_blocks, max_model_len=info.max_model_len, group=cfg.group,
        pid=os.getpid(),
    )
    try:
        while True:
            try:
                await worker_registry.beat(r, keys, entry, ttl_ms)
            except STORE_DOWN as e:
                # Redis is away (restarting, failing over): keep serving; the next beat
                # registers again.
                log.warning("heartbeat failed: %s", e)
            except STORE_ERRORS as e:  # not an outage: say so at every beat
                log.error("heartbeat refused by Redis: %s: %s", type(e).__name__, e)
            await asyncio.sleep(cfg.heartbeat_s)
    finally:
        with contextlib.suppress(Exception):
            await worker_registry.leave(r, keys, info.worker_id)
        await r.aclose()


async def serve(cfg: pwconfig.WorkerConfig) -> None:
    tls = TLSFiles.from_config(cfg)  # bad flags fail here, before the model loads
    # Redis too: a wrong URL or password is said now, not after the model has loaded.
    r = await redis_client.connect_or_exit(cfg.redis_url, "worker") if cfg.redis_url else None
    server, health_servicer = serving.new_server([SERVICE])
    port = serving.add_port(server, f"{cfg.host}:{cfg.port}", tls)
    cfg.port = port
    service = WorkerService()
    guarded_service.add_service(server, worker_pb2.DESCRIPTOR.services_by_name["Worker"], service)
    await serving.set_serving(health_servicer, [SERVICE], False)
    await server.start()
    log.info("loading %s", cfg.model)
    runner, info = await compute_thread.run(build_runner, cfg)  # the thread every CPU step runs on
    service.runner, service.info = runner, info
    if cfg.warmup_s > 0:  # CPU bfloat16: the packed products' builds, now (see packed_linear.warm)
        t0 = time.perf_counter()
        rows = await compute_thread.run(warm, runner.model, cfg.max_num_batched_tokens, cfg.warmup_s)
        if rows:
            log.info("built the packed products for %d row counts (1-%d) in %.1f s", len(rows),
                     rows[-1], time.perf_counter() - t0)
    registry = metrics.new_registry()
    service.metrics = metrics.worker_metrics(registry, info.model, info.worker_id)
    metrics_server = metrics.serve_metrics(cfg.metrics_port, registry, cfg.host)
    if metrics_server.port >= 0:
        log.info("metrics on http://%s:%d/metrics", cfg.host, metrics_server.port)
    address = cfg.advertise or f"{cfg.host}:{port}"
    if runner.constraints is not None:
        await runner.constraints.built()  # its thread holds the GIL: not during the first steps
    heartbeat = asyncio.create_task(register(cfg, r, info, address)) if r is not None else None
    await serving.set_serving(health_servicer, [SERVICE], True)
    log.info(
        "worker %s serving %s on %s: %d KV blocks of %d tokens, %s, %s attention",
        info.worker_id, info.model, address, info.num_blocks, info.block_size, info.dtype,
        info.attention_backend,
    )

    async def drain() -> None:
        """SIGTERM: health is NOT_SERVING; give the sequences held a chance to finish (whatever
        is still here at the deadline recomputes on another worker)."""
        while service.num_sequences:
            await asyncio.sleep(0.1)

    try:
        await serving.run_until_signalled(server, health_servicer, [SERVICE], drain=drain,
                                          drain_timeout_s=cfg.drain_timeout_s)
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
        metrics_server.stop()
        tracing.shutdown_tracing()


def main(argv: Sequence[str] | None = None) -> None:
    cfg = pwconfig.parse(pwconfig.WorkerConfig, argv, prog="pagewire-worker")
    if pick_device(cfg.device).type == "cpu":
        cpu_heap.keep_freed_memory()  # before any thread takes an arena of its own
    logs.setup_logging(cfg.log_level, f"worker[{socket.gethostname()}]", cfg.log_format)
    tracing.init_tracing("pagewire-worker")
    if not cfg.model:
        sys.exit("--model is required")
    serving.run_main(lambda: serve(cfg))


if __name__ == "__main__":
    main()
