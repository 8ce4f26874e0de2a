"""The scheduler's image rules: runs checked, encoder budget per step, hashes with images."""

from __future__ import annotations

import numpy as np

from pagewire.images import image_input
from pagewire.sampling import SamplingParams
from pagewire.v1 import common_pb2
from scheduler_svc import images
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler, SchedulerLimits

PX = np.zeros((3, 2, 2), dtype=np.float32)


def im(offset: int, length: int, value: float = 0.0) -> common_pb2.ImageInput:
    return image_input(PX + value, offset, length)


def test_check_refuses_runs_outside_the_prompt_or_overlapping() -> None:
    assert images.check([im(2, 4), im(6, 4)], 10) is None
    assert "images[1]" in (images.check([im(2, 4), im(5, 4)], 20) or "")
    assert "images[0]" in (images.check([im(8, 4)], 10) or "")
    bad = im(0, 2)
    bad.pixel_values = b"\0" * 5
    assert "float32" in (images.check([bad], 4) or "")


def test_check_refuses_a_grid_that_does_not_match_the_patches() -> None:
    """Qwen2.5-VL: pixel_values holds grid_t * grid_h * grid_w patches."""
    patches = np.zeros((16, 12), dtype=np.float32)
    assert images.check([image_input(patches, 0, 4, (1, 4, 4))], 8) is None
    assert "grid_thw" in (images.check([image_input(patches, 0, 4, (1, 4, 2))], 8) or "")
    assert "grid_thw" in (images.check([image_input(patches, 0, 4, (4, 4))], 8) or "")


def test_clip_chunk_cuts_before_an_image_past_the_budget() -> None:
    runs = [im(4, 10), im(20, 10)]
    assert images.clip_chunk(runs, 0, 40, 100, 100, True) == (40, 20)
    assert images.clip_chunk(runs, 0, 40, 15, 15, True) == (20, 10)  # second image: next step
    assert images.clip_chunk(runs, 0, 40, 0, 15, True) == (4, 0)  # spent: the text before it
    assert images.clip_chunk(runs, 0, 40, 5, 15, True) == (4, 0)  # 10 > 5 left
    # The step's first image always runs, even one larger than the whole budget.
    assert images.clip_chunk([im(0, 50)], 0, 60, 10, 10, True) == (60, 50)


def test_clip_chunk_charges_an_image_once_per_send() -> None:
    runs = [im(4, 10)]
    assert images.clip_chunk(runs, 8, 10, 0, 5, False) == (10, 0)  # encoded by an earlier chunk
    assert images.clip_chunk(runs, 8, 10, 0, 5, True) == (0, 0)  # resent: encodes again


def test_the_encoder_budget_spreads_images_over_steps() -> None:
    limits = SchedulerLimits(8, 1000, 4, 1000, (0,), max_encoder_tokens=10)
    s = Scheduler(limits, BlockPool(256))
    reqs = [Request(f"r{i}", list(range(1, 31)), SamplingParams(temperature=0, max_tokens=2),
                    images=[im(2, 10, i), im(14, 10, i)]) for i in range(2)]
    for r in reqs:
        s.add(r)
    chunks = []
    for _ in range(4):
        batch = s.schedule()
        chunks.append([(x.request.request_id, x.start, x.num_tokens) for x in batch.seqs])
        s.update(batch, [7] * len(batch.sampling_order()))
    # One image (10 tokens) starts encoding per step; text before an image still runs.
    assert chunks == [[("r0", 0, 14), ("r1", 0, 2)], [("r0", 14, 16)], [("r1", 2, 12)],
                      [("r1", 14, 16)]]


def test_same_prompt_with_another_image_misses_the_prefix_cache() -> None:
    limits = SchedulerLimits(8, 1000, 4, 1000, (0,))
    s = Scheduler(limits, BlockPool(256))
    prompt = [1, 2, 3, 4, 5, *[9] * 8, 6, 7, 8, 10, 11, 12]

    def run(value: float) -> Request:
        r = Request(f"r{value}", list(prompt), SamplingParams(temperature=0, max_tokens=1),
                    images=[im(5, 8, value)])
        s.add(r)
        while not r.finished:
            batch = s.schedule()
            s.update(batch, [7] * len(batch.sampling_order()))
        return r

    run(1.0)
    assert run(1.0).num_cached == 16  # all full blocks but the one whose logits are needed
    assert run(2.0).num_cached == 4  # only the block before the image


def test_images_are_kept_in_redis_with_a_ttl_and_a_request_without_them_is_not_resumed(
    redis_client, redis_url: str
) -> None:
    import asyncio

    import redis.asyncio as aioredis

    from pagewire.redis_keys import RedisKeys
    from scheduler_svc.state_store import StateStore

    keys = RedisKeys("test-images", "model")
    with_images = Request("img", list(range(1, 20)), SamplingParams(), images=[im(2, 4, 1.0)])
    plain = Request("txt", [1, 2, 3], SamplingParams())

    async def body() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            store = StateStore(client, keys, "w0")
            await store.reset("inst", 8)
            for r in (with_images, plain):
                store.admitted(r)
            await store.flush()
            ttl = await client.ttl(keys.request_images("img"))
            assert 0 < ttl <= images.IMAGES_TTL_S
            pool = await store.load()
            assert pool is not None
            loaded = {r.request_id: r for r in pool.requests}
            assert loaded["img"].images == with_images.images and loaded["txt"].images == []
            await client.delete(keys.request_images("img"))  # expired
            pool = await store.load()
            assert pool is not None and [r.request_id for r in pool.requests] == ["txt"]
            with_images.finish_reason = common_pb2.FINISH_REASON_STOP
            store.finished(with_images)
            await store.flush()
        finally:
            await client.aclose()

    asyncio.run(body())
