"""Continuous batching for one worker: which requests run this step, with how many tokens.

``schedule()`` is the decision, returned as plain data (:class:`ScheduledBatch`); ``update()``
applies the worker's sampled tokens and says which requests finished. Running requests go first
(one token each for decodes, the next chunk for unfinished prefills), then waiting requests in
priority/FCFS order take what is left of the token budget, so a long prompt is split into chunks
and never stalls decodes. When blocks run out, the lowest-priority, latest-arrived running request
is preempted: it gives its blocks back and recomputes from prompt + output later.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pagewire.block_hash import block_hash, image_extra, prompt_block_hashes
from pagewire.v1 import common_pb2
from scheduler_svc import images
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.request import Request, Status


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    prefix_caching: bool = True
    # A waiting request gains one priority level per this many seconds (0: no aging).
    priority_aging_s: float = 10.0
    # Image placeholder tokens whose encoding may start in one step (see scheduler_svc.images).
    max_encoder_tokens: int = 4096


@dataclass
class ScheduledSeq:
    request: Request
    start: int  # first position computed this step
    num_tokens: int
    new_blocks: list[int]
    sample: bool
    resend: bool  # worker must receive full state (first time, or after preemption)
    epoch: int = 0  # the request's epoch when scheduled


@dataclass
class ScheduledBatch:
    """One step. Plain decodes (one token, the worker's own last sample, of a sequence the worker
    holds) are packed in parallel lists, the bulk of a steady-state step with no object per
    sequence; everything else (prefill chunks, first steps, resends) is a ScheduledSeq."""

    seqs: list[ScheduledSeq] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)
    decode_blocks: list[int] = field(default_factory=list)  # appended first; -1: none
    decode_indices: list[int] = field(default_factory=list)  # output index sampled
    decode_epochs: list[int] = field(default_factory=list)
    appended: list[tuple[Request, int]] = field(default_factory=list)  # decodes' new blocks
    preempted: list[Request] = field(default_factory=list)
    released: list[Request] = field(default_factory=list)  # finished/aborted since the last step
    sent_at: float = 0.0  # perf_counter when the step went to the worker (step time metric)

    @property
    def num_seqs(self) -> int:
        return len(self.seqs) + len(self.decodes)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(s.num_tokens for s in self.seqs)

    def requests(self) -> list[Request]:
        return [*self.decodes, *(s.request for s in self.seqs)]

    def sampling_order(self) -> list[Request]:
        """The requests that get a token, in the order the worker returns them."""
        return [*self.decodes, *(s.request for s in self.seqs if _samples(s))]


def _samples(s: ScheduledSeq) -> bool:
    """A token comes back for this sequence (an embedding's last chunk returns its pooling)."""
    return s.sample and s.request.pooling == common_pb2.POOLING_NONE


def _unstarted(r: Request) -> bool:
    """Nothing of ``r`` is here: no output token, no block, no token in flight."""
    return not r.output and not r.block_table and not r.pending


def _priority_key(r: Request) -> tuple[int, float]:
    return (-r.priority, r.arrival)


class Scheduler:
    def __init__(self, limits: SchedulerLimits, pool: BlockPool) -> None:
        self.limits = limits
        self.pool = pool
        self.waiting: list[Request] = []  # kept sorted by (priority desc, arrival)
        self.running: list[Request] = []
        self._released: list[Request] = []
        # Blocks given back since the last drain, per request: what the state store must record.
        self.freed: list[tuple[Request, list[int]]] = []
        self.num_preemptions = 0
        self.finished_now: list[Request] = []  # finished by the last update(), in its order
        self._eos = frozenset(limits.eos_token_ids)
        self._running_sorted = True

    # ---- queue changes -------------------------------------------------------------------
    def add(self, req: Request) -> None:
        bisect.insort(self.waiting, req, key=_priority_key)

    def abort(self, req: Request) -> None:
        """Finish ``req`` now and give its blocks back (effective before the next step).

        Safe while a step is in flight only because the engine never schedules step N+1 before
        step N's result is back: a freed block cannot be handed out while the worker writes it.
        """
        if req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        req.aborted = True
        self._finish(req, common_pb2.FINISH_REASON_ABORT)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._released)

    def load_tokens(self) -> int:
        """Tokens still to compute or generate: the load figure for placing new requests."""
        return sum(r.num_tokens - r.num_computed + r.params.max_tokens - len(r.output)
                   for r in (*self.waiting, *self.running))

    # ---- the decision --------------------------------------------------------------------
    def _blocks_needed(self, req: Request, num_tokens: int) -> int:
        bs = self.limits.block_size
        return -(-(req.num_computed + num_tokens) // bs) - len(req.block_table)

    def _preempt(self, victim: Request, batch: ScheduledBatch) -> None:
        self.running.remove(victim)
        self.pool.release(victim.block_table)
        self.freed.append((victim, victim.block_table))
        victim.block_table = []
        victim.block_hashes = []
        victim.epoch += 1
        victim.num_computed = 0
        victim.on_worker = False
        victim.status = Status.WAITING
        bisect.insort_left(self.waiting, victim, key=_priority_key)  # ahead of later arrivals
        batch.preempted.append(victim)
        self.num_preemptions += 1

    def _take(self, req: Request, num_tokens: int, batch: ScheduledBatch) -> None:
        new_blocks = self.pool.allocate(self._blocks_needed(req, num_tokens))
        req.block_table.extend(new_blocks)
        start = req.num_computed
        req.num_computed += num_tokens
        batch.seqs.append(
            ScheduledSeq(
                request=req,
                start=start,
                num_tokens=num_tokens,
                new_blocks=new_blocks,
                sample=req.num_computed == req.num_tokens,
                resend=not req.on_worker,
                epoch=req.epoch,
            )
        )
        req.on_worker = True
        if batch.seqs[-1].sample:
            req.pending += 1

    def _age_waiting(self) -> None:
        """With mixed priorities, let waiting requests climb with age so none waits forever."""
        aging = self.limits.priority_aging_s
        if aging <= 0 or len({r.priority for r in self.waiting}) < 2:
            return
        now = time.monotonic()
        self.waiting.sort(key=lambda r: (-(r.priority + (now - r.arrival) / aging), r.arrival))

    def schedule(self) -> ScheduledBatch:
        self._age_waiting()
        batch = ScheduledBatch(released=self._released)
        self._released = []
        budget = self.limits.max_num_batched_tokens
        max_seqs, max_len, bs = self.limits.max_num_seqs, self.limits.max_model_len, self.limits.block_size
        pool, running = self.pool, self.running
        # Running requests, highest priority / earliest first; victims come from the other end.
        if not self._running_sorted:
            running.sort(key=_priority_key)
            self._running_sorted = True
        i = nseqs = 0
        encoder = self.limits.max_encoder_tokens  # left this step
        # The decode columns' appends, bound once: the loop below runs once per running request.
        add_decode, add_position = batch.decodes.append, batch.decode_positions.append
        add_block, add_index, add_epoch = (batch.decode_blocks.append, batch.decode_indices.append,
                                           batch.decode_epochs.append)
        while i < len(running) and budget > 0 and nseqs < max_seqs:
            req = running[i]
            out, pending, computed, prompt = len(req.output), req.pending, req.num_computed, len(req.prompt)
            total = prompt + out + pending
            n = total - computed
            if n == 0 or (pending and (out + pending >= req.params.max_tokens or total >= max_len)):
                i += 1  # waits for the tokens of steps in flight, or they already end it
                continue
            if n == 1 and computed >= prompt and req.on_worker:
                # A plain decode: the hot path, no per-sequence object.
                block = -1
                if computed >= len(req.block_table) * bs:
                    if not pool.num_free:
                        victim = running[-1]
                        self._preempt(victim, batch)
                        if victim is req:
                            break
                        continue
                    block = pool.allocate(1)[0]
                    req.block_table.append(block)
                    batch.appended.append((req, block))
                add_decode(req)
                add_position(computed)
                add_block(block)
                add_index(out + pending)
                add_epoch(req.epoch)
                req.num_computed = computed + 1
                req.pending = pending + 1
                budget -= 1
                nseqs += 1
                i += 1
                continue
            n = min(n, budget)
            if req.images:
                n, cost = images.clip_chunk(req.images, computed, n, encoder,
                                            self.limits.max_encoder_tokens, not req.on_worker)
                encoder -= cost
                if n == 0:
                    i += 1
                    continue
            while self._blocks_needed(req, n) > pool.num_free:
                victim = running[-1]
                self._preempt(victim, batch)
                if victim is req:
                    break
            else:
                self._take(req, n, batch)
                budget -= n
                nseqs += 1
                i += 1
                continue
            break  # req itself was preempted: nothing after it can run either
        # Waiting requests, in order, while budget, sequence slots and blocks last.
        while self.waiting and budget > 0 and nseqs < max_seqs:
            req = self.waiting[0]
            if req in batch.preempted or req.pending:
                break  # preempted this step, or its last tokens are still in flight
            hits = self._cached_prefix(req)
            n = min(req.num_tokens - len(hits) * self.limits.block_size, budget)
            # Reusing cached blocks takes them out of the evictable set: count them as needed.
            reusable = sum(1 for b in hits if self.pool.ref_count[b] == 0)
            need = -(-(len(hits) * self.limits.block_size + n) // self.limits.block_size) - len(hits)
            if need + reusable > self.pool.num_free:
                break  # strict FCFS: do not let later requests jump a stuck one
            self.waiting.pop(0)
            self._admit(req, hits)
            n = min(req.num_tokens - req.num_computed, budget)
            if req.images:
                n, cost = images.clip_chunk(req.images, req.num_computed, n, encoder,
                                            self.limits.max_encoder_tokens, True)
                encoder -= cost
                if n == 0:
                    break  # admitted; its chunk runs from the running list next step
            self._take(req, n, batch)
            budget -= n
            nseqs += 1
        return batch

    def _cached_prefix(self, req: Request) -> list[int]:
        """Cached blocks for the request's leading full blocks (none with caching off)."""
        if not self.limits.prefix_caching or not req.uses_prefix_cache:
            return []
        hashes = prompt_block_hashes(req.tokens(0, req.num_tokens), self.limits.block_size,
                                     req.images, req.cache_salt)
        req.block_hashes = hashes  # provisional: trimmed to what is really in the table below
        return self.pool.lookup(hashes)

    def _admit(self, req: Request, hits: list[int]) -> None:
        bs = self.limits.block_size
        self.pool.acquire(hits)
        if self.limits.prefix_caching and req.uses_prefix_cache:
            self.pool.count_lookup(len(req.block_hashes), len(hits))
        req.block_table = list(hits)
        req.block_hashes = req.block_hashes[: len(hits)]
        # A fully cached sequence still computes its last token (its logits are needed).
        req.num_computed = min(len(hits) * bs, req.num_tokens - 1)
        if req.num_cached < 0:
            req.num_cached = req.num_computed
        req.status = Status.RUNNING
        self.running.append(req)
        self._running_sorted = False

    def _register_full_blocks(self, req: Request, computed: int) -> None:
        """Name every newly full block among the first ``computed`` tokens by its chained hash."""
        bs = self.limits.block_size
        full = min(min(computed, req.num_known) // bs, len(req.block_table))
        parent = req.block_hashes[-1] if req.block_hashes else None
        for i in range(len(req.block_hashes), full):
            extra = image_extra(req.images, i * bs, (i + 1) * bs) if req.images else b""
            parent = block_hash(parent, req.tokens(i * bs, (i + 1) * bs), extra, req.cache_salt)
            req.block_hashes.append(parent)
            self.pool.register(req.block_table[i], parent)

    # ---- applying results ----------------------------------------------------------------
    def update(
        self,
        batch: ScheduledBatch,
        tokens: Sequence[int],
        logprobs: Sequence[common_pb2.Logprobs] = (),
        embeddings: dict[int, Sequence[float]] | None = None,
    ) -> list[Request]:
        """Apply a step's results; return the requests that got tokens or finished.

        ``tokens`` (and ``logprobs`` when any were asked for) are in ``batch.sampling_order()``;
        ``embeddings`` maps an embedding sequence's seq_id to its pooled hidden state.
        """
        touched: list[Request] = []
        touch = touched.append
        released_before = len(self._released)
        caching, bs = self.limits.prefix_caching, self.limits.block_size
        max_len, eos, finished = self.limits.max_model_len, self._eos, Status.FINISHED
        lps = iter(logprobs) if logprobs else itertools.repeat(None)
        for req, token, pos, epoch, lp in zip(
            batch.decodes, tokens, batch.decode_positions, batch.decode_epochs, lps, strict=False
        ):
            pending = req.pending
            if pending:
                req.pending = pending - 1
            if req.status is finished:
                continue  # finished by an earlier step: a token sampled past the end is dropped
            out = req.output
            out.append(token)
            touch(req)
            p = req.params
            if lp is not None and p.logprobs is not None:
                req.logprobs.append(lp)
            if caching and epoch == req.epoch and (pos + 1) // bs > len(req.block_hashes):
                self._register_full_blocks(req, pos + 1)
            n = len(out)
            if (token in eos or p.stop_token_ids or n >= p.max_tokens
                    or len(req.prompt) + n >= max_len):
                reason = self._stop_reason(req, token)
                if reason:
                    self.running.remove(req)
                    self._finish(req, reason)
        rest = iter(tokens[len(batch.decodes):])
        for s in batch.seqs:
            req = s.request
            token = lp = None
            if _samples(s):
                token, lp = next(rest), next(lps)
            if s.sample:
                req.pending = max(req.pending - 1, 0)
            if req.finished:
                continue
            if token is not None:
                req.output.append(token)
                touched.append(req)
                if lp is not None and req.params.logprobs is not None:
                    req.logprobs.append(lp)
            if caching and s.epoch == req.epoch:
                self._register_full_blocks(req, s.start + s.num_tokens)
            reason = self._stop_reason(req, token) if token is not None else 0
            if s.sample and req.pooling != common_pb2.POOLING_NONE and s.epoch == req.epoch:
                req.embedding = list((embeddings or {}).get(req.seq_id, ()))
                touched.append(req)
                reason = common_pb2.FINISH_REASON_STOP
            if reason:
                (self.running if req in self.running else self.waiting).remove(req)
                self._finish(req, reason)
        self.finished_now = self._released[released_before:]
        return touched

    def _stop_reason(self, req: Request, token: int) -> int:
        p = req.params
        # Before min_tokens the worker masks stop tokens; a stop token seen anyway is not a stop.
        can_stop = len(req.output) > p.min_tokens
        if can_stop and not p.ignore_eos and token in self._eos:
            return common_pb2.FINISH_REASON_STOP
        if can_stop and token in p.stop_token_ids:
            return common_pb2.FINISH_REASON_STOP
        if len(req.output) >= p.max_tokens or req.num_tokens >= self.limits.max_model_len:
            return common_pb2.FINISH_REASON_LENGTH
        return common_pb2.FINISH_REASON_UNSPECIFIED

    def _finish(self, req: Request, reason: int) -> None:
        req.status = Status.FINISHED
        req.finish_reason = reason
        if req.block_table:
            self.pool.release(req.block_table)
            self.freed.append((req, req.block_table))
            req.block_table = []
        self._released.append(req)

    def restore(self, requests: list[Request]) -> None:
        """Take back requests reloaded from Redis; their block tables are already in the pool.

        A request with output has every token but the last in the worker's KV (that is how its
        last token was sampled). One still in prefill keeps only the cached leading blocks it can
        prove by hash; the rest of its prompt is computed again.
        """
        bs = self.limits.block_size
        for req in requests:
            if not req.block_table:
                self.add(req)
                continue
            if req.output:
                req.num_computed = req.num_tokens - 1
            else:
                hashes = prompt_block_hashes(req.tokens(0, req.num_tokens), bs, req.images,
                                             req.cache_salt)
                proven = 0
                for h, b in zip(hashes, req.block_table, strict=False):
                    if self.pool.index.get(h) != b:
                        break
                    proven += 1
                req.num_computed = min(proven * bs, req.num_tokens - 1)
            req.num_computed = min(req.num_computed, len(req.block_table) * bs)
            req.block_hashes = []
            self._register_full_blocks(req, req.num_computed)
            req.status = Status.RUNNING
            self.running.append(req)
            self._running_sorted = False

    def take_all(self) -> list[Request]:
        """Remove every request (the worker is lost): each gives up its blocks and recomputes."""
        reqs = sorted([*self.running, *self.waiting], key=_priority_key)
        for req in reqs:
            req.block_table, req.block_hashes = [], []
            req.num_computed = req.pending = 0
            req.epoch += 1
            req.on_worker = False
            req.status = Status.WAITING
        self.running, self.waiting = [], []
        self.pool = BlockPool(self.pool.num_blocks)
        self.freed = []
        return reqs

    def has_unstarted(self) -> bool:
        return any(_unstarted(r) for r in self.waiting)

    def take_unstarted(self) -> list[Request]:
        """Remove and return the waiting requests that have nothing here (the worker is
        draining): no output token, no block, no token in flight. Moving one elsewhere costs
        nothing -- at most a partial prefill computed before a preemption. A preempted request
        with output stays: it is work in flight, and recomputes here as it would have anyway."""
        moved = [r for r in self.waiting if _unstarted(r)]
        if moved:
            self.waiting = [r for r in self.waiting if not _unstarted(r)]
        for req in moved:
            req.epoch += 1  # results of a step still in flight no longer describe it
            req.num_computed = 0
            req.on_worker = False
        return moved

    def drain_freed(self) -> list[tuple[Request, list[int]]]:
        freed, self.freed = self.freed, []
        return freed

    def check_invariants(self) -> None:
        self.pool.check([r.block_table for r in (*self.running, *self.waiting)])

