"""What a Redis outage looks like to a pagewire process: one home for the exceptions every
service sorts into "the store is away, hold on and try again" and "the store refused".

The scheduler, its lease and heartbeat watch, the worker's registration and the router's
directory reads all meet the same redis-py exceptions; they are listed here once, so a new kind
of outage (a cluster error redis-py adds) is taught to every service at the same time.
"""

from __future__ import annotations

import redis

# What an unreachable or moving store looks like to a client: a restart, a dropped connection, a
# failover or slot migration under way. Callers hold their state and try again.
STORE_DOWN = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError,
    redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError, redis.exceptions.MovedError,
    redis.exceptions.AskError, redis.exceptions.ClusterError,
    redis.exceptions.RedisClusterException,  # "cannot be connected": no node answers
)
# Anything a Redis call may raise (redis-py's cluster exceptions are not all RedisErrors).
STORE_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)


class StateLost(redis.exceptions.ConnectionError):
    """Redis answers but no longer holds a writer's state (it restarted empty while no write was
    in flight to notice). A kind of STORE_DOWN: the writer handles it like a failed write, by
    rewriting its state from memory."""
