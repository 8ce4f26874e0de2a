"""The router process: the public ``Generation`` API over gRPC, and OpenAI's HTTP API beside it.

Both fronts share one request path (``router.generation``, ``router.embed``): validate, tokenize,
submit to the scheduler over the router's one ``Connect`` stream, turn tokens back into text. The
router keeps no state that must survive it.
Start: ``python -m router.server --model DIR --scheduler HOST:PORT [--http-port N]``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from pagewire import config as pwconfig
from pagewire import serving
from pagewire.sampling import Limits
from router import openai_http
from router.generation import Generator
from router.grpc_service import SERVICE, GenerationService, add_to_server
from router.model import ServedModel
from router.scheduler_link import SchedulerLink

log = logging.getLogger("router")


async def serve(cfg: pwconfig.RouterConfig) -> None:
    if not cfg.model or not cfg.scheduler:
        raise SystemExit("--model and --scheduler are required")
    model = ServedModel.load(cfg)
    link = SchedulerLink(cfg.scheduler, cfg.resume_timeout_s)
    limits = Limits(
        max_n=cfg.max_n, max_logprobs=cfg.max_logprobs, max_stop_strings=cfg.max_stop_strings
    )
    generator = Generator(model, link, limits)
    server, health_servicer = serving.new_server([SERVICE])
    add_to_server(GenerationService(model, generator, link), server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    await server.start()
    await serving.wait_healthy(cfg.scheduler, timeout=300)
    link_task = asyncio.create_task(link.run())
    http = None
    if cfg.http_port >= 0:
        http = await openai_http.start(cfg, model, generator, link)
    await serving.set_serving(health_servicer, [SERVICE], True)
    log.info(
        "router on %s:%d serving %s via scheduler %s", cfg.host, port, model.name, cfg.scheduler
    )
    try:
        await serving.run_until_signalled(server, health_servicer, [SERVICE])
    finally:
        if http is not None:
            await http.cleanup()
        link_task.cancel()
        await asyncio.gather(link_task, return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = pwconfig.parse(pwconfig.RouterConfig, argv, prog="pagewire-router")
    serving.setup_logging(cfg.log_level, "router")
    serving.run_main(lambda: serve(cfg))


if __name__ == "__main__":
    main()
