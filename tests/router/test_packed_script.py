from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from router.packed_script import PackedScript

ECHO = "local out = {} for i = 1, #KEYS do out[i] = KEYS[i] end out[#out + 1] = #ARGV return out"


def test_packed_call_matches_its_keys_and_args_and_follows_key_changes(redis_url: str) -> None:
    async def run() -> None:
        r = aioredis.Redis.from_url(redis_url)
        try:
            tag = f"{{ps-{uuid.uuid4().hex[:8]}}}"
            script = PackedScript(r, ECHO)
            script.set_keys([f"{tag}:a".encode(), f"{tag}:bb".encode()])
            assert await script([b"x" * 16, b""]) == [f"{tag}:a".encode(), f"{tag}:bb".encode(), 2]
            script.set_keys([f"{tag}:c".encode()])
            assert await script([]) == [f"{tag}:c".encode(), 0]
        finally:
            await r.aclose()

    asyncio.run(run())


def test_script_lost_by_the_server_is_loaded_again(redis_url: str) -> None:
    async def run() -> None:
        r = aioredis.Redis.from_url(redis_url)
        try:
            script = PackedScript(r, ECHO + " -- lost")
            script.set_keys([b"{ps}:k"])
            await r.script_flush()
            assert await script([b"h"]) == [b"{ps}:k", 1]
        finally:
            await r.aclose()

    asyncio.run(run())
