"""The router process: the public ``Generation`` API over gRPC, and OpenAI's HTTP API beside it.

Both fronts share one request path (``router.generation``, ``router.embed``): validate, tokenize,
place the request on a worker and its scheduler (``router.placement``), submit it over that
scheduler's one ``Connect`` stream, turn tokens back into text. The router keeps no state that
must survive it.
Start: ``python -m router.server --model DIR --redis-url URL [--http-port N]`` (the schedulers of
every worker group are found in Redis), or with ``--scheduler HOST:PORT`` for one fixed scheduler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from pagewire import auth, logs, metrics, redis_client, serving, tracing
from pagewire import config as pwconfig
from pagewire.redis_keys import RedisKeys
from pagewire.sampling import Limits
from pagewire.tls import TLSFiles
from router import openai_http
from router.generation import Generator
from router.grpc_service import SERVICE, GenerationService, add_to_server
from router.model import ServedModel
from router.placement import Placer
from router.routing import WorkerRouter
from router.scheduler_link import SchedulerLink
from router.schedulers import FixedScheduler, SchedulerGroups, Schedulers

log = logging.getLogger("router")


async def serve(cfg: pwconfig.RouterConfig) -> None:
    if not cfg.model or not (cfg.scheduler or cfg.redis_url):
        raise SystemExit("--model, and --scheduler or --redis-url (to find the schedulers), are required")
    tls = TLSFiles.from_config(cfg)  # bad flags fail here, before the model loads
    model = ServedModel.load(cfg)
    keys = RedisKeys(cfg.deployment, model.name)
    store = await redis_client.connect_or_exit(cfg.redis_url, "router") if cfg.redis_url else None
    schedulers: Schedulers
    if cfg.scheduler:
        schedulers = FixedScheduler(SchedulerLink(cfg.scheduler, cfg.resume_timeout_s, tls))
    else:
        assert store is not None
        schedulers = SchedulerGroups(store, keys, cfg.resume_timeout_s, tls)
    limits = Limits(
        max_n=cfg.max_n, max_logprobs=cfg.max_logprobs, max_stop_strings=cfg.max_stop_strings
    )
    registry = metrics.new_registry()
    rm = metrics.router_metrics(registry, model.name, model.max_model_len)
    metrics_server = metrics.serve_metrics(cfg.metrics_port, registry, cfg.host)
    if metrics_server.port >= 0:
        log.info("metrics on http://%s:%d/metrics", cfg.host, metrics_server.port)
    router = None if store is None else WorkerRouter(store, keys, cfg.routing_policy)
    placer = Placer(schedulers, router, rm)
    generator = Generator(model, placer, limits, rm)
    server, health_servicer = serving.new_server(
        [SERVICE],
        interceptors=auth.interceptors(cfg.api_key),
        max_receive_bytes=serving.PUBLIC_MAX_RECEIVE_BYTES,
    )
    add_to_server(GenerationService(model, generator, placer), server)
    port = serving.add_port(server, f"{cfg.host}:{cfg.port}", tls)
    await server.start()
    links_task = asyncio.create_task(schedulers.run())
    await schedulers.wait_ready(timeout=300)
    http = None
    if cfg.http_port >= 0:
        http = await openai_http.start(cfg, model, generator, placer, tls, registry)
    await serving.set_serving(health_servicer, [SERVICE], True)
    log.info("router on %s:%d serving %s via %s", cfg.host, port, model.name,
             f"scheduler {cfg.scheduler}" if cfg.scheduler else "the scheduler groups in Redis")

    async def drain() -> None:
        """SIGTERM: health is NOT_SERVING already; refuse new requests, let those in flight
        finish."""
        generator.draining = True
        while schedulers.in_flight:
            await asyncio.sleep(0.1)

    try:
        await serving.run_until_signalled(server, health_servicer, [SERVICE], drain=drain,
                                          drain_timeout_s=cfg.drain_timeout_s)
    finally:
        if http is not None:
            await http.cleanup()
        links_task.cancel()
        await asyncio.gather(links_task, return_exceptions=True)
        metrics_server.stop()
        if store is not None:
            await store.aclose()
        tracing.shutdown_tracing()


def main(argv: Sequence[str] | None = None) -> None:
    cfg = pwconfig.parse(pwconfig.RouterConfig, argv, prog="pagewire-router")
    logs.setup_logging(cfg.log_level, "router", cfg.log_format)
    tracing.init_tracing("pagewire-router")
    serving.run_main(lambda: serve(cfg))


if __name__ == "__main__":
    main()
