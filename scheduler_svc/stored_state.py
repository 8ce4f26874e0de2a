"""What Redis holds for one worker and its requests, read back: at start-up, and for a router
resuming a request that finished just before a restart.

Per worker: a set of free blocks, a sorted set of cached unreferenced blocks (LRU by score), the
prefix index (block hash -> block), which worker instance all that describes, and a token log
of (handle, token) int32 pairs. Per request: a hash (:func:`request_fields`), its block table (a
list) and its output tokens (a string of packed int32); a request's output is its string
followed by its entries in the worker's log. The writing side is ``state_store``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagewire.redis_client import Client
from pagewire.redis_keys import RedisKeys
from pagewire.sampling import SamplingParams
from pagewire.v1 import common_pb2
from scheduler_svc import images
from scheduler_svc.request import Request, Status
from scheduler_svc.step_write import pack, unpack


def request_fields(req: Request, worker_id: str) -> dict[str, bytes | int | str]:
    """A request's hash: the prompt and how to sample it, where it runs, its log handle."""
    return {
        "worker": worker_id,
        "priority": req.priority,
        "prompt": pack(req.prompt),
        "params": req.params.to_proto().SerializeToString(),
        "pooling": req.pooling,
        "handle": req.seq_id,
        "images": len(req.images),
        "cache_salt": req.cache_salt,
    }


def worker_state(instance_id: str, num_blocks: int) -> dict[str, str | int]:
    """Which worker process, with how large a pool, the worker's KV bookkeeping describes."""
    return {"instance_id": instance_id, "num_blocks": num_blocks}


@dataclass
class StoredRequest:
    """A request as Redis holds it: enough to resume it by recompute or to replay its output."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    priority: int
    output: list[int]
    block_table: list[int]
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    num_cached: int = 0
    pooling: int = common_pb2.POOLING_NONE
    handle: int = 0  # its id in the worker's token log
    num_checkpointed: int = 0  # output tokens that were in its own string (the rest: the log)
    images: list[common_pb2.ImageInput] = field(default_factory=list)
    images_lost: bool = False  # it had images and Redis no longer has them (TTL): not resumable
    cache_salt: bytes = b""  # SubmitRequest.cache_salt, mixed into its block hashes

    def to_request(self) -> Request:
        """The live request again, every output token counted as delivered (what a router did
        not get it replays on resume); a finished one only to be replayed."""
        req = Request(self.request_id, self.prompt, self.params, priority=self.priority,
                      output=self.output, block_table=self.block_table,
                      num_cached=self.num_cached, pooling=self.pooling,
                      finish_reason=self.finish_reason, images=self.images,
                      cache_salt=self.cache_salt)
        if self.finish_reason:
            req.status = Status.FINISHED
        req.replayed()
        req.num_checkpointed = self.num_checkpointed
        return req


@dataclass
class StoredPool:
    instance_id: str
    num_blocks: int
    cached_lru: list[int]  # oldest first
    index: dict[bytes, int]
    requests: list[StoredRequest] = field(default_factory=list)


async def load_pool(r: Client, keys: RedisKeys, worker_id: str) -> tuple[StoredPool, int] | None:
    """What Redis holds for the worker and the size of its token log in bytes, or None."""
    k, w = keys, worker_id
    state = await r.hgetall(k.worker_state(w))
    if not state:
        return None
    cached = await r.zrange(k.cached_blocks(w), 0, -1)
    index = await r.hgetall(k.prefix_index(w))
    pool = StoredPool(
        instance_id=state[b"instance_id"].decode(),
        num_blocks=int(state[b"num_blocks"]),
        cached_lru=[int(b) for b in cached],
        index={h: int(b) for h, b in index.items()},
    )
    logged: dict[int, list[int]] = {}
    pairs = unpack(await r.get(k.token_log(w)) or b"")
    for handle, token in zip(pairs[::2], pairs[1::2], strict=True):
        logged.setdefault(handle, []).append(token)
    for rid in sorted(m.decode() for m in await r.smembers(k.requests())):
        stored = await load_request(r, keys, rid)
        if stored is not None and stored[1] == w and not stored[0].images_lost:
            req = stored[0]
            req.num_checkpointed = len(req.output)
            req.output += logged.get(req.handle, [])
            pool.requests.append(req)
    return pool, len(pairs) * 4


async def load_request(r: Client, keys: RedisKeys, rid: str) -> tuple[StoredRequest, str] | None:
    """One request and the worker it ran on (a finished one too, while its TTL lasts)."""
    async with r.pipeline(transaction=False) as p:
        p.hgetall(keys.request(rid))
        p.get(keys.request_tokens(rid))
        p.lrange(keys.request_blocks(rid), 0, -1)
        p.get(keys.request_images(rid))
        info, tokens, blocks, image_data = await p.execute()
    if not info:
        return None
    params = SamplingParams.from_proto(common_pb2.SamplingParams.FromString(info[b"params"]))
    stored = StoredRequest(
        request_id=rid,
        prompt=unpack(info[b"prompt"]),
        params=params,
        priority=int(info[b"priority"]),
        output=unpack(tokens or b""),
        block_table=[int(b) for b in blocks],
        finish_reason=int(info.get(b"finish_reason", 0)),
        num_cached=int(info.get(b"num_cached", 0)),
        pooling=int(info.get(b"pooling", 0)),
        handle=int(info.get(b"handle", 0)),
        images=images.unpack(image_data),
        cache_salt=info.get(b"cache_salt", b""),
    )
    stored.images_lost = len(stored.images) != int(info.get(b"images", 0))
    return stored, info[b"worker"].decode()
