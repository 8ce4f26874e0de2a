"""Where a request goes: a worker chosen by the routing policy, and the link to its scheduler.

The policy (``router.routing``) scores the workers the router's schedulers can reach -- with
several groups, the workers of every live group -- and the request is submitted on the link of
the chosen worker's group. Without Redis, when Redis does not answer, or when its registry is
empty (it restarted empty), there is no decision: the request goes to a live scheduler (the least
busy connected link) and that scheduler picks its worker. With no scheduler connected, the request
is refused UNAVAILABLE at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from pagewire.block_hash import ImageSpan
from pagewire.metrics import RouterMetrics
from pagewire.store_outage import STORE_ERRORS
from router.errors import RequestError
from router.request_ids import InFlightIds
from router.routing import NoWorkerAvailable, WorkerRouter
from router.scheduler_link import SchedulerLink
from router.schedulers import Schedulers

log = logging.getLogger("router")


@dataclass(frozen=True)
class Placement:
    worker_id: str  # empty: the scheduler picks one of its workers
    link: SchedulerLink


class Placer:
    def __init__(
        self,
        schedulers: Schedulers,
        router: WorkerRouter | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.schedulers = schedulers
        self.router = router
        self.metrics = metrics
        self.ids = InFlightIds()  # ids of the requests submitted through this placer, not ended

    async def place(
        self, prompt: list[int], images: Sequence[ImageSpan] = (), salt: bytes = b""
    ) -> Placement:
        """``images``: the prompt's, whose hashes name the blocks they occupy. Raises RequestError(UNAVAILABLE) when no live worker or connected scheduler can take
        it: a request is refused at once, never held for a scheduler that is away."""
        if self.router is not None:
            try:
                decision = await self.router.choose(prompt, self.schedulers.eligible, images, salt)
            except NoWorkerAvailable as e:
                if e.registered:  # workers are registered, and none is alive and serving
                    raise RequestError(grpc.StatusCode.UNAVAILABLE, "", str(e)) from None
                # An empty registry: Redis restarted empty, and the workers have not beaten
                # since. Their schedulers know them: one of those places the request.
                log.info("no worker registered in Redis: the scheduler places the request")
            except STORE_ERRORS as e:
                log.warning("routing without Redis (%s): the scheduler places the request", e)
            else:
                link = self.schedulers.link_for(decision.worker_id)
                # None: its group left since the decision began; not connected: its scheduler
                # is away (restarting), and another group's may take the request.
                if link is not None and link.connected:
                    if self.metrics is not None:
                        self.metrics.observe_routed(self.router.policy)
                    return Placement(decision.worker_id, link)
        link = self.schedulers.fallback()
        if link is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "",
                               "no scheduler is reachable (down or restarting); retry")
        return Placement("", link)
