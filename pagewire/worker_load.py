"""The load figures a scheduler publishes for each worker it drives, and routers read.

Every step the scheduler writes a worker's :class:`LoadFigures` into its load hash
(``RedisKeys.worker_load``) with the step's one script call; an idle worker's scheduler writes
``draining`` alone when it changes. Routers read the :data:`ROUTING_FIELDS` of every worker in
their routing script (``router.routing``), whose field list is built from here: the names have
one home, and a renamed figure cannot leave the router reading a field nobody writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoadFigures:
    running: int  # sequences in the running batch
    waiting: int  # requests queued (new, preempted)
    waiting_tokens: int  # prompt + output tokens of the waiting requests: prefill ahead
    used_blocks: int  # KV blocks not allocatable (referenced)
    total_blocks: int
    preemptions: int  # since the worker was attached
    prefix_queries: int  # prefix-cache lookups, in blocks
    prefix_hits: int
    steps: int  # steps completed: a router tells fresh figures from stale ones by it
    draining: int  # 1: the worker's health is not SERVING; no router chooses it

    def as_dict(self) -> dict[str, int]:
        """The hash's fields and values."""
        return {name: getattr(self, name) for name in FIELDS}


FIELDS = tuple(f.name for f in dataclasses.fields(LoadFigures))
DRAINING = "draining"
# What the routing script reads of every worker, in this order.
ROUTING_FIELDS = ("running", "waiting_tokens", "used_blocks", "steps", DRAINING)
assert set(ROUTING_FIELDS) <= set(FIELDS)


def lua_field_list(names: tuple[str, ...] = ROUTING_FIELDS) -> str:
    """``'running', 'waiting_tokens', ...``: the names as a Lua argument list."""
    return ", ".join(f"'{n}'" for n in names)
