"""Where a request goes: a worker chosen by the routing policy, and the link to its scheduler.

The policy (``router.routing``) scores the workers the router's schedulers can reach -- with
several groups, the workers of every live group -- and the request is submitted on the link of
the chosen worker's group. Without Redis, or when Redis does not answer, there is no decision:
the request goes to a live scheduler (the least busy link) and that scheduler picks its worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
import redis

from pagewire.metrics import RouterMetrics
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

    async def place(self, prompt: list[int]) -> Placement:
        """Raises RequestError(UNAVAILABLE) when no live worker or scheduler can take it."""
        if self.router is not None:
            try:
                decision = await self.router.choose(prompt, self.schedulers.eligible)
            except NoWorkerAvailable as e:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "", str(e)) from None
            except redis.exceptions.RedisError as e:
                log.warning("routing without Redis (%s): the scheduler places the request", e)
            else:
                link = self.schedulers.link_for(decision.worker_id)
                if link is not None:  # None: its group left since the decision began
                    if self.metrics is not None:
                        self.metrics.observe_routed(self.router.policy)
                    return Placement(decision.worker_id, link)
        link = self.schedulers.fallback()
        if link is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "", "no live scheduler")
        return Placement("", link)
