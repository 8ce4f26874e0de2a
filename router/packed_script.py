"""A Lua script call whose keys change rarely: the command is packed when they change, and each
call only appends its arguments.

redis-py packs every argument of every command in Python (about 160 us for the router's 300 key
names, a fifth of a decision). Here the wire form of ``EVALSHA sha numkeys key...`` (RESP: a
``$<len>`` line and the bytes of each argument) is built once per ``set_keys()``; a call writes
the argument count, that prefix and its own arguments on a pooled connection, with redis-py's
retry on connection errors, and loads the script once if the server has lost it (a restart).

On a Redis Cluster the packed command goes to the node that owns the keys' slot (they share one
hash tag, so there is one), on that node's pooled connection. A reply that says the slot is
elsewhere (MOVED, ASK: a migration or failover under way) or a node that does not answer sends
that one call through the cluster client instead, which follows the redirection and refreshes
its slot map; the next call packs for the new owner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import AskError, ConnectionError, MovedError, NoScriptError, TimeoutError

from pagewire.redis_client import Client

_REDIRECTED = (MovedError, AskError, ConnectionError, TimeoutError, OSError)


def resp_bulk(values: Sequence[bytes]) -> bytes:
    """RESP bulk strings, one per value."""
    return b"".join(b"$%d\r\n%b\r\n" % (len(v), v) for v in values)


class PackedScript:
    """``EVALSHA`` of one script over a fixed key list (all in one slot on a cluster)."""

    def __init__(self, redis: Client, source: str) -> None:
        self.redis, self.source = redis, source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # as the server names it
        self.set_keys([])

    def set_keys(self, keys: Sequence[bytes]) -> None:
        self._keys = list(keys)
        self._nargs = 3 + len(keys)
        self._prefix = resp_bulk([b"EVALSHA", self.sha.encode(), b"%d" % len(keys), *keys])

    async def __call__(self, args: Sequence[bytes]) -> list:
        packed = [b"*%d\r\n" % (self._nargs + len(args)), self._prefix, resp_bulk(args)]
        try:
            return await self._send(packed, args)
        except NoScriptError:
            await self.redis.script_load(self.source)
            return await self._send(packed, args)

    async def _send(self, packed: list[bytes], args: Sequence[bytes]) -> list:
        if isinstance(self.redis, aioredis.RedisCluster):
            return await self._send_to_owner(self.redis, packed, args)
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

    async def _send_to_owner(
        self, cluster: aioredis.RedisCluster, packed: list[bytes], args: Sequence[bytes]
    ) -> list:
        if not self._keys:  # no key, no slot: any node runs it
            return await cluster.execute_command("EVALSHA", self.sha, 0, *args)
        node = cluster.get_node_from_key(self._keys[0])
        conn = node.acquire_connection()
        try:
            await conn.send_packed_command(packed)
            return await conn.read_response()
        except _REDIRECTED:
            await conn.disconnect()
        finally:
            node.release(conn)
        return await cluster.execute_command("EVALSHA", self.sha, len(self._keys), *self._keys, *args)
