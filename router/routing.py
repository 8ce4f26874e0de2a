"""Which worker a request goes to: prefix-aware and load-aware, from one Redis round trip.

Every decision reads, in one EVALSHA, for each registered worker: whether its heartbeat key still
exists (a lapsed heartbeat means it is never chosen), how many leading blocks of the prompt its
prefix index holds (the chained block hash names a block's whole prefix, so the run stops at the
first miss), and the load figures its scheduler publishes every step. Worker membership and
block size change rarely, so they are cached here and re-read every ``refresh_s`` seconds. With
several scheduler groups, the candidates are the workers of the live groups only (``eligible``,
given by ``router.schedulers``): a worker whose scheduler is gone is never chosen. Nor is a
worker whose scheduler has published ``draining=1`` in its load figures: it is shutting down (its
health is NOT_SERVING), finishes what it holds and takes nothing new; when every candidate is
draining the request fails at once with UNAVAILABLE, the status clients retry.

Policies:

- ``prefix`` (default) picks the worker with the highest ``score = cached - penalty``, in tokens:

  - ``cached``: prompt tokens the worker already holds (leading blocks x block size) -- the
    prefill it saves;
  - ``penalty = queued + RUNNING_TOKENS * running + prompt_len * kv_pressure``, an estimate of
    the prefill-equivalent work ahead of this request there:
    ``queued`` is the published ``waiting_tokens`` plus what this router has sent the worker
    since its scheduler last published (so a burst is not herded onto one worker before the
    figures catch up); each waiting token is prefill that runs first, so it weighs one.
    ``RUNNING_TOKENS = 16``: a running sequence takes one token of every step's budget while
    this prompt waits and prefills, about a block's worth over a typical wait -- enough to break
    ties and spread decode-heavy load, small beside a cached prefix of hundreds of tokens.
    ``kv_pressure = max(0, used/total - KV_SAFE_USE) / (1 - KV_SAFE_USE)`` with
    ``KV_SAFE_USE = 0.75``: nothing while a quarter of the pool is unreferenced, rising to one
    whole prompt at a full pool, where admitting it means waiting for blocks or preempting (and
    later recomputing) a request of about its size.

  A cold prompt (no live worker holds its first block) goes to the top worker of a rendezvous
  hash of its first block hash, so repeats of a new prefix meet on one worker and every router
  agrees where, unless that worker's penalty exceeds the lowest by more than the prompt's length:
  then the wait there would cost more than the cache hit a repeat could save, and it goes to the
  least-penalised worker. A prompt shorter than one block has nothing to cache and goes by load.
- ``least-load`` picks the lowest penalty (cached tokens ignored); ties rotate.
- ``round-robin`` cycles over the live workers in id order.

A worker whose block size differs from the fleet's most common one never matches the prompt's
hashes (they are computed at the common size), so it is seen as cold but still takes load.

Cost: at 100 workers a decision takes about 0.55 ms (p90 about 0.65 ms) on a shared 2-core
machine (``bench/routing.py``; 0.75 ms before 2026-12-02). Over half is Redis running the script
(about 0.3 ms: a load HMGET and a HEXISTS per worker, the longer reads of the workers that hold
the prefix); about 0.1 ms the round trip itself, though the command's 300 key names are packed
only when membership is re-read (``router/packed_script.py``); 0.05 ms hashing the prompt's
blocks and 0.05 ms scoring (numpy over the workers). It grows linearly with the number of
registered workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Sequence, Set
from dataclasses import dataclass

import numpy as np

from pagewire.block_hash import ImageSpan, prompt_block_hashes
from pagewire.redis_client import Client
from pagewire.redis_keys import RedisKeys
from pagewire.worker_load import DRAINING, ROUTING_FIELDS, lua_field_list
from pagewire.worker_registry import read_entries
from router.packed_script import PackedScript

POLICIES = ("prefix", "least-load", "round-robin")
RUNNING_TOKENS = 16
KV_SAFE_USE = 0.75

# KEYS: every worker's heartbeat, then every worker's prefix index, then every worker's load.
# ARGV: the prompt's block hashes in order. Returns five integers per worker: leading blocks
# cached (-1: heartbeat gone, -2: draining, and its prefix is not read), then running,
# waiting_tokens, used_blocks (0 where the scheduler has published none) and steps (-1 where it
# has published none). The load figures' names come from ``pagewire.worker_load``. The heartbeats are one MGET. A worker
# lacking the first block, the common case, costs one HEXISTS (inside a script a fifth of an
# HMGET's cost); a match is then read on in HMGETs of 4, 16, 64, ... (at most 1,024) hashes to
# the first miss.
_AT = {name: i + 1 for i, name in enumerate(ROUTING_FIELDS)}  # Lua's index of each figure read
DECISION_LUA = f"""
local call, nw, n, out, o = redis.call, #KEYS / 3, #ARGV, {{}}, 0
local alive, first, none = call('MGET', unpack(KEYS, 1, nw)), ARGV[1], {{}}
for w = 1, nw do
  local matched, f = -1, none
  if alive[w] then
    f = call('HMGET', KEYS[2 * nw + w], {lua_field_list()})
    local index = KEYS[nw + w]
    matched = 0
    if f[{_AT[DRAINING]}] == '1' then
      matched = -2
    elseif n > 0 and call('HEXISTS', index, first) == 1 then
      local chunk, missed = 4, false
      matched = 1
      while matched < n and not missed do
        local last = math.min(matched + chunk, n)
        local found = call('HMGET', index, unpack(ARGV, matched + 1, last))
        for i = 1, #found do
          if not found[i] then missed = true break end
          matched = matched + 1
        end
        chunk = math.min(chunk * 4, 1024)  -- unpack() takes a few thousand values at most
      end
    end
  end
  out[o + 1] = matched
  out[o + 2] = tonumber(f[{_AT['running']}]) or 0
  out[o + 3] = tonumber(f[{_AT['waiting_tokens']}]) or 0
  out[o + 4] = tonumber(f[{_AT['used_blocks']}]) or 0
  out[o + 5] = tonumber(f[{_AT['steps']}]) or -1
  o = o + 5
end
return out
"""


class NoWorkerAvailable(Exception):
    """No registered worker has a live heartbeat and takes new work (the caller answers
    UNAVAILABLE). ``registered``: how many workers the registry names at all -- none is what a
    Redis that restarted empty looks like until the workers' next beats, which says nothing about
    the workers themselves."""

    def __init__(self, message: str, registered: int) -> None:
        super().__init__(message)
        self.registered = registered


@dataclass(frozen=True)
class Decision:
    worker_id: str
    cached_tokens: int  # prompt tokens the chosen worker held at decision time
    reason: str  # longest-prefix, load, cold-affinity, cold-spill, least-load, round-robin


@dataclass(frozen=True)
class Member:
    """A registered worker, as cached between refreshes."""

    worker_id: str
    block_size: int
    num_blocks: int  # the KV pool's size, which the scheduler also publishes as total_blocks


@dataclass(slots=True)
class WorkerView:
    """One live worker as one decision sees it."""

    worker_id: str
    cached_tokens: int
    penalty: float  # load_penalty, plus what this router sent that the figures do not show yet
    steps: int  # its scheduler's step count when it published the figures (-1: none yet)
    draining: bool = False  # shutting down: finishes what it holds, takes nothing new


def load_penalty(waiting_tokens: np.ndarray, running: np.ndarray, used_blocks: np.ndarray,
                 total_blocks: np.ndarray, prompt_len: int) -> np.ndarray:
    """Prefill-equivalent tokens ahead of a new request, per worker (the module docstring says
    why); the same float64 arithmetic, worker by worker, as scalar Python."""
    kv_use = np.divide(used_blocks, total_blocks, out=np.zeros(len(total_blocks)),
                       where=total_blocks > 0)
    kv_pressure = np.maximum(0.0, kv_use - KV_SAFE_USE) / (1.0 - KV_SAFE_USE)
    return waiting_tokens + RUNNING_TOKENS * running + prompt_len * kv_pressure


def rendezvous_rank(key: bytes, worker_id: str) -> int:
    """Highest-random-weight hash: each key's top worker moves only if that worker leaves."""
    digest = hashlib.blake2b(key + worker_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class WorkerRouter:
    """Chooses a worker per request; one per router process, shared by all its requests."""

    def __init__(
        self, redis: Client, keys: RedisKeys, policy: str = "prefix", refresh_s: float = 1.0
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"routing policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.redis, self.keys, self.policy, self.refresh_s = redis, keys, policy, refresh_s
        self._script = PackedScript(redis, DECISION_LUA)
        self._members: list[Member] = []
        self._block_size = 0
        self._num_blocks = self._matched_tokens = np.zeros(0, dtype=np.int64)  # per member
        self._fresh_until = 0.0
        self._refresh_lock = asyncio.Lock()
        self._turn = 0
        # worker -> (its scheduler's step count when we last sent it work, uncached tokens sent
        # since): work the published figures do not show yet.
        self._pending: dict[str, tuple[int, int]] = {}

    async def choose(
        self, prompt_token_ids: Sequence[int], eligible: Set[str] | None = None,
        images: Sequence[ImageSpan] = (), salt: bytes = b"",
    ) -> Decision:
        """The worker for this prompt, among ``eligible`` (None: every registered worker) -- the
        workers a live scheduler drives. Raises NoWorkerAvailable when none has a live heartbeat."""
        await self._ensure_members()
        hashes = (
            prompt_block_hashes(prompt_token_ids, self._block_size, images, salt)
            if self.policy == "prefix" and self._block_size else []
        )
        alive = await self._alive(hashes, len(prompt_token_ids), eligible)
        if not alive:
            await self._refresh()  # the membership cached may predate a Redis restart
            alive = await self._alive(hashes, len(prompt_token_ids), eligible)
        live = [w for w in alive if not w.draining]
        if not live:
            where = "registered" if eligible is None else "driven by a live scheduler"
            draining = len(alive)
            why = f" ({draining} draining: shutting down; retry)" if draining else ""
            raise NoWorkerAvailable(f"no live worker {where} for model {self.keys.model!r}{why}",
                                    len(self._members))
        if self.policy == "round-robin":
            chosen, reason = live[self._turn % len(live)], "round-robin"
            self._turn += 1
        elif self.policy == "least-load" or not hashes:
            chosen, reason = self._least_loaded(live), "least-load"
        elif max(w.cached_tokens for w in live) == 0:
            chosen, reason = self._cold(live, hashes[0], len(prompt_token_ids))
        else:
            chosen, reason = self._best_prefix(live, hashes[0])
        self._note_sent(chosen, len(prompt_token_ids) - chosen.cached_tokens)
        return Decision(chosen.worker_id, chosen.cached_tokens, reason)

    # ---- the policies --------------------------------------------------------------------
    def _least_loaded(self, live: list[WorkerView]) -> WorkerView:
        start = self._turn % len(live)
        self._turn += 1
        rotated = live[start:] + live[:start]  # equal penalties (an idle fleet) take turns
        return min(rotated, key=lambda w: w.penalty)

    @staticmethod
    def _cold(live: list[WorkerView], first_hash: bytes, prompt_len: int) -> tuple[WorkerView, str]:
        home = max(live, key=lambda w: rendezvous_rank(first_hash, w.worker_id))
        lightest = min(live, key=lambda w: w.penalty)
        if home.penalty - lightest.penalty > prompt_len:
            return lightest, "cold-spill"
        return home, "cold-affinity"

    @staticmethod
    def _best_prefix(live: list[WorkerView], first_hash: bytes) -> tuple[WorkerView, str]:
        best = max(w.cached_tokens - w.penalty for w in live)
        tied = [w for w in live if w.cached_tokens - w.penalty == best]
        chosen = max(tied, key=lambda w: rendezvous_rank(first_hash, w.worker_id))
        longest = max(w.cached_tokens for w in live)
        return chosen, "longest-prefix" if chosen.cached_tokens == longest else "load"

    # ---- load this router has sent but not yet seen published -----------------------------
    def _pending_tokens(self, worker_id: str, steps: int) -> int:
        seen_at, tokens = self._pending.get(worker_id, (steps, 0))
        return tokens if seen_at == steps else 0  # a newer step's figures include that work

    def _note_sent(self, w: WorkerView, uncached_tokens: int) -> None:
        self._pending[w.worker_id] = (
            w.steps, self._pending_tokens(w.worker_id, w.steps) + uncached_tokens)

    # ---- Redis -----------------------------------------------------------------------------
    async def _alive(
        self, hashes: list[bytes], prompt_len: int, eligible: Set[str] | None
    ) -> list[WorkerView]:
        alive = await self._read(hashes, prompt_len)
        return alive if eligible is None else [w for w in alive if w.worker_id in eligible]

    async def _read(self, hashes: list[bytes], prompt_len: int) -> list[WorkerView]:
        """The one round trip of a decision: the live workers (draining ones flagged, their
        prefix unread), their cached run and load."""
        if not self._members:
            return []
        matched, running, waiting, used, steps = (
            np.array(await self._script(hashes), dtype=np.int64).reshape(-1, 5).T)
        # Scored for every worker at once; a worker of another block size never matches.
        cached = matched * self._matched_tokens
        penalty = load_penalty(waiting, running, used, self._num_blocks, prompt_len)
        live = []
        rows = zip(self._members, matched.tolist(), cached.tolist(), penalty.tolist(),
                   steps.tolist(), strict=True)
        for m, blocks, tokens, load, step in rows:
            if blocks == -1:
                continue
            if blocks == -2:
                live.append(WorkerView(m.worker_id, 0, 0.0, step, draining=True))
                continue
            live.append(WorkerView(m.worker_id, tokens, load + self._pending_tokens(m.worker_id, step),
                                   step))
        return live

    async def _ensure_members(self) -> None:
        if time.monotonic() < self._fresh_until:
            return
        async with self._refresh_lock:
            if time.monotonic() >= self._fresh_until:
                await self._refresh()

    async def _refresh(self) -> None:
        """Re-read the registry: worker ids and their block sizes (two round trips, ~1/s)."""
        k = self.keys
        self._members = [
            Member(e.worker_id, e.block_size, e.num_blocks)
            for e in await read_entries(self.redis, k) if e.block_size
        ]
        sizes = Counter(m.block_size for m in self._members)
        self._block_size = sizes.most_common(1)[0][0] if sizes else 0
        self._num_blocks = np.array([m.num_blocks for m in self._members], dtype=np.int64)
        self._matched_tokens = np.array(  # tokens per matched block; 0 at another block size
            [self._block_size if m.block_size == self._block_size else 0 for m in self._members],
            dtype=np.int64)
        self._script.set_keys([  # packed once: a decision then packs only the prompt's hashes
            key(m.worker_id).encode()
            for key in (k.worker_alive, k.prefix_index, k.worker_load) for m in self._members
        ])
        self._fresh_until = time.monotonic() + self.refresh_s
