"""A Lua script call whose keys change rarely: the command is packed when they change, and each
call only appends its arguments.

redis-py packs every argument of every command in Python (about 160 us for the router's 300 key
names, a fifth of a decision). Here the wire form of ``EVALSHA sha numkeys key...`` (RESP: a
``$<len>`` line and the bytes of each argument) is built once per ``set_keys()``; a call writes
the argument count, that prefix and its own arguments on a pooled connection, with redis-py's
retry on connection errors, and loads the script once if the server has lost it (a restart).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError


def resp_bulk(values: Sequence[bytes]) -> bytes:
    """RESP bulk strings, one per value."""
    return b"".join(b"$%d\r\n%b\r\n" % (len(v), v) for v in values)


class PackedScript:
    """``EVALSHA`` of one script over a fixed key list, for a plain (not cluster) client."""

    def __init__(self, redis: aioredis.Redis, source: str) -> None:
        self.redis, self.source = redis, source
        self.sha = redis.register_script(source).sha  # hex SHA1, as the server names it
        self.set_keys([])

    def set_keys(self, keys: Sequence[bytes]) -> None:
        self._nargs = 3 + len(keys)
        self._prefix = resp_bulk([b"EVALSHA", self.sha.encode(), b"%d" % len(keys), *keys])

    async def __call__(self, args: Sequence[bytes]) -> list:
        packed = [b"*%d\r\n" % (self._nargs + len(args)), self._prefix, resp_bulk(args)]
        try:
            return await self._send(packed)
        except NoScriptError:
            await self.redis.script_load(self.source)
            return await self._send(packed)

    async def _send(self, packed: list[bytes]) -> list:
        pool = self.redis.connection_pool
        conn = await pool.get_connection()

        async def send_and_read() -> list:
            await conn.send_packed_command(packed)
            return await conn.read_response()

        async def reconnect(_error: Exception) -> None:
            await conn.disconnect()

        try:
            return await conn.retry.call_with_retry(send_and_read, reconnect)
        finally:
            await pool.release(conn)
