"""A worker's engine adopts what Redis recorded for it, when the scheduler attaches the worker
(at start-up, or after taking the group over from another scheduler).

If the worker is the same process (same instance id and pool size) its KV memory is intact:
block tables, the prefix cache and computed tokens are kept. Otherwise the bookkeeping starts
afresh and the requests recompute from prompt + output. Either way each request's logged tokens
move into its own string first, under the log handle of this incarnation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scheduler_svc.block_pool import BlockPool
from scheduler_svc.request import Request
from scheduler_svc.stored_state import StoredPool

if TYPE_CHECKING:
    from scheduler_svc.step_loop import WorkerEngine


async def recover(engine: WorkerEngine, stored: StoredPool | None) -> list[Request]:
    """The requests Redis says ``engine``'s worker held, now in its scheduler."""
    store, sched, info = engine.store, engine.scheduler, engine.info
    reqs = [s.to_request() for s in stored.requests] if stored else []
    if stored is not None:
        store.checkpoint(reqs, handles=True)
        await store.flush()
    if stored is not None and (stored.instance_id, stored.num_blocks) == (
            info.instance_id, info.num_blocks):
        sched.kv.pool = BlockPool.restore(
            info.num_blocks, [r.block_table for r in reqs], stored.index, stored.cached_lru)
        sched.restore(reqs)
        sched.check_invariants()
    else:
        await store.reset(info.instance_id, info.num_blocks)
        for req in reqs:
            req.block_table = []
            store.dropped_table(req)
            sched.add(req)
    return reqs
