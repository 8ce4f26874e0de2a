"""How a scheduler learns that a worker is draining: it watches the worker's grpc.health.v1 status.

On SIGTERM a worker turns NOT_SERVING at once (``pagewire.serving.run_until_signalled``), then
finishes what it holds. The scheduler follows that status with ``Health.Watch`` on a stream of its
own, and a worker that is not SERVING gets no new requests (``Fleet.set_serving``).

Why this signal and not another:

- it already exists and means exactly "send me no new work": it is what Kubernetes probes and
  load balancers read, so the scheduler, the kubelet and any proxy agree on one truth, and no
  proto had to change;
- it is pushed the moment it changes, even while the worker is idle. A flag in ``StepResult``
  would only arrive with the next step's result -- and an idle worker's next step is the new
  request the scheduler should not have placed there;
- the Redis registry would be polled (a heartbeat period of delay) and would make the scheduler's
  placement depend on a second party's writes; the scheduler instead publishes what it learned in
  the worker's load figures (``draining``), which the routers already read.

A worker that is still loading is NOT_SERVING too; the scheduler treats it the same way (no new
requests) until it reports SERVING. At the scheduler's start the two differ (``probe``): a draining
worker describes itself and is attached at once, as draining; a loading one cannot, and is
attached in the background once it serves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagewire import serving
from pagewire.tls import TLSFiles
from pagewire.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("scheduler.health")

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
RETRY_S = 0.5  # between attempts while the worker is unreachable (stopped, restarting)


async def watch_health(
    address: str, tls: TLSFiles | None, on_status: Callable[[bool], None], retry_s: float = RETRY_S
) -> None:
    """Call ``on_status(serving)`` with every status the worker at ``address`` reports, until
    cancelled. While the worker cannot be reached nothing is reported: losing a worker is the
    step stream's and the heartbeat's to notice, and a worker that comes back reports again."""
    request = health_pb2.HealthCheckRequest(service=WORKER_SERVICE)
    while True:
        try:
            async with serving.open_channel(address, tls) as channel:
                async for resp in health_pb2_grpc.HealthStub(channel).Watch(request):
                    on_status(resp.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.aio.AioRpcError as e:
            log.debug("health watch of %s: %s", address, e.code())
        await asyncio.sleep(retry_s)


async def probe(address: str, tls: TLSFiles | None) -> tuple[worker_pb2.WorkerInfo, bool] | None:
    """The worker's description and whether it is SERVING, asked once; None while it cannot
    describe itself (still loading its model, or unreachable). A worker that describes itself
    but is not SERVING is draining: it has its model, and will not take work again."""
    try:
        async with serving.open_channel(address, tls) as channel:
            info = await worker_pb2_grpc.WorkerStub(channel).Describe(
                worker_pb2.DescribeRequest(), timeout=5)
            resp = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=WORKER_SERVICE), timeout=5)
    except grpc.aio.AioRpcError:
        return None
    return info, resp.status == health_pb2.HealthCheckResponse.SERVING
