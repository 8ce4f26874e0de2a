"""The one way every pagewire process talks to Redis: a client chosen by URL, checked at start.

- ``redis://[:password@]host:port[/db]``, ``rediss://...`` (TLS; ``?ssl_ca_certs=ca.pem``),
  ``unix:///path/redis.sock[?password=...]``: one Redis endpoint (a single server, or a managed
  service that hides its shards behind one endpoint).
- ``redis+cluster://[:password@]host:port``, ``rediss+cluster://...``: a Redis Cluster (or a
  managed service that speaks the cluster protocol). Any node will do: it is only where the
  client first learns the slot map. The client follows ``MOVED`` / ``ASK`` and re-reads the map
  when slots move or a master fails over. Every key of one deployment and model shares one hash
  tag (``pagewire.redis_keys``), so each multi-key command, transaction and Lua script -- the
  scheduler's one script call per step, the router's routing script -- stays in one slot.

:func:`connect` pings the store and turns what goes wrong at start-up into one line that says
what to fix: Redis unreachable, a missing or wrong password, a cluster node named by a plain
URL (or a plain server by a cluster URL). The password is never printed. What an outage looks
like once running is ``pagewire.store_outage``'s.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis

from pagewire.store_outage import STORE_ERRORS

Client = aioredis.Redis | aioredis.RedisCluster
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

class RedisSetupError(Exception):
    """Redis cannot be used as configured; the message says why and what to change."""


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def _plain_url(url: str) -> str:
    """The URL redis-py takes: a cluster scheme becomes its plain one."""
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, *parts[1:]))


def redact(url: str) -> str:
    """``url`` with its password (in the authority or the query) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password:
        url = url.replace(f":{parts.password}@", ":***@", 1)
    for q in parts.query.split("&"):
        if q.startswith("password="):
            url = url.replace(q, "password=***")
    return url


def client(url: str) -> Client:
    """An asyncio client for ``url`` (not yet connected: see :func:`connect`)."""
    if is_cluster_url(url):
        return aioredis.RedisCluster.from_url(_plain_url(url))
    return aioredis.Redis.from_url(url)


def sync_client(url: str) -> redis.Redis | redis.RedisCluster:
    """A blocking client for ``url``, for tests, benchmarks and tools."""
    if is_cluster_url(url):
        return redis.RedisCluster.from_url(_plain_url(url))
    return redis.Redis.from_url(url)


def is_cluster(r: Client) -> bool:
    return isinstance(r, aioredis.RedisCluster)


async def connect(url: str) -> Client:
    """A client for ``url`` that has answered a PING; RedisSetupError with what to fix if not."""
    if not url:
        raise RedisSetupError("no Redis URL: set --redis-url or REDIS_URL")
    where = redact(url)
    if is_cluster_url(url) and not urlsplit(url).hostname:
        raise RedisSetupError(f"Redis URL {where}: a cluster is reached over TCP, "
                              "redis+cluster://host:port")
    try:
        r = client(url)
    except (ValueError, *STORE_ERRORS) as e:
        raise RedisSetupError(f"Redis URL {where} is not usable: {e}") from None
    try:
        await r.ping()
        if not is_cluster(r) and await _cluster_enabled(r):
            raise RedisSetupError(
                f"Redis at {where} is a Redis Cluster node: a plain client would fail on every "
                f"key another node owns (MOVED). Use a cluster URL: {_cluster_url(where)}")
    except RedisSetupError:
        await r.aclose()
        raise
    except STORE_ERRORS as e:
        await r.aclose()
        raise RedisSetupError(_explain(where, e)) from None
    return r


async def _cluster_enabled(r: aioredis.Redis) -> bool:
    try:
        return bool((await r.info("cluster")).get("cluster_enabled"))
    except redis.exceptions.ResponseError:  # INFO refused (some managed services): no verdict
        return False


def _cluster_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme + "+cluster", *parts[1:]))


def _explain(where: str, e: Exception) -> str:
    text = str(e)
    if isinstance(e, redis.exceptions.AuthenticationError) or any(
            w in text for w in ("NOAUTH", "WRONGPASS", "invalid password", "without any password",
                                "invalid username-password", "already authenticated")):
        return (f"Redis at {where} refused the credentials ({text}): put the password in the URL "
                "(redis://:PASSWORD@host:port, or ?password=... for unix://)")
    if "Cluster mode is not enabled" in text or "cluster support disabled" in text:
        return (f"Redis at {where} is not a cluster node, but the URL asks for a cluster: use "
                "redis:// (or rediss://, unix://) for a single endpoint")
    if isinstance(e, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError) or (
            "reachable node" in text):
        return f"cannot reach Redis at {where}: {text}"
    return f"Redis at {where} failed at start-up: {type(e).__name__}: {text}"


async def connect_or_exit(url: str, who: str) -> Client:
    """:func:`connect` for a service starting up: a RedisSetupError ends the process with its
    one-line reason (exit status 1), not a traceback."""
    try:
        return await connect(url)
    except RedisSetupError as e:
        raise SystemExit(f"{who}: {e}") from None
