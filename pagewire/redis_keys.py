"""Redis key names, one place for all services.

Every key of one deployment and model carries the same hash tag ``{deployment:model}``, so a
clustered Redis keeps them in one slot and multi-key transactions work.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    deployment: str
    model: str

    @property
    def prefix(self) -> str:
        return f"pw:{{{self.deployment}:{self.model}}}"

    # Worker registry: a set of worker ids, a hash of each worker's description, and a key with a
    # TTL that the worker refreshes (the heartbeat; gone = dead).
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker_info(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}:info"

    def worker_alive(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}:alive"

    # Per worker KV bookkeeping, owned by the scheduler: the set of free block ids, and the
    # published load figures routers read.
    def free_blocks(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}:free"

    def cached_blocks(self, worker_id: str) -> str:
        """Sorted set of unreferenced blocks that hold cached content, scored by last use."""
        return f"{self.prefix}:worker:{worker_id}:cached"

    def prefix_index(self, worker_id: str) -> str:
        """Hash: 16-byte chained block hash -> block id, for every cached block of the worker."""
        return f"{self.prefix}:worker:{worker_id}:prefix"

    def worker_state(self, worker_id: str) -> str:
        """Hash: which worker instance and pool size the KV bookkeeping above describes."""
        return f"{self.prefix}:worker:{worker_id}:state"

    def worker_load(self, worker_id: str) -> str:
        """Hash: the figures the scheduler publishes each step (running, waiting_tokens,
        used_blocks, steps, ...) and ``draining`` (1: the worker's health is not SERVING; it gets
        no new requests and routers never choose it)."""
        return f"{self.prefix}:worker:{worker_id}:load"

    # Schedulers: the lease that makes one scheduler the driver of a worker group (a second
    # replica waits for it), and the group directory routers read: where each group's scheduler
    # listens and which workers it drives, both written only by the lease holder (a group whose
    # lease has lapsed is not live, whatever the directory still says).
    def scheduler_lease(self, group: str) -> str:
        return f"{self.prefix}:scheduler:{group}:lease"

    def schedulers(self) -> str:
        """Hash: worker group -> address of the scheduler holding its lease."""
        return f"{self.prefix}:schedulers"

    def group_workers(self, group: str) -> str:
        """Set: ids of the workers the group's scheduler drives."""
        return f"{self.prefix}:scheduler:{group}:workers"

    def token_log(self, worker_id: str) -> str:
        """String: (request handle, token) int32 pairs appended once per step, oldest first --
        the tokens of the worker's requests not yet checkpointed into their own strings."""
        return f"{self.prefix}:worker:{worker_id}:tokens"

    # Per request: a hash of its description (prompt, sampling, worker, state), the list of its
    # block ids (its block table) and its generated token ids (a string of packed int32).
    def requests(self) -> str:
        return f"{self.prefix}:requests"

    def request(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}"

    def request_blocks(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}:blocks"

    def request_images(self, request_id: str) -> str:
        """String: the request's images (an ImageInputs message; see scheduler_svc.images)."""
        return f"{self.prefix}:req:{request_id}:images"

    def request_tokens(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}:tokens"
