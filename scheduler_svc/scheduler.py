"""Continuous batching for one worker: which requests run this step, with how many tokens.

``schedule()`` is the decision, returned as plain data (``batch.ScheduledBatch``); ``update()``
applies the worker's sampled tokens and says which requests finished. Running requests go first
(one token each for decodes, the next chunk for unfinished prefills), then waiting requests in
priority/FCFS order take what is left of the token budget, so a long prompt is split into chunks
and never stalls decodes. When blocks run out, the lowest-priority, latest-arrived running request
is preempted: it gives its blocks back and recomputes from prompt + output later. What a decision
costs in blocks, and the block tables themselves, are the KV-cache manager's.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pagewire.v1 import common_pb2
from scheduler_svc import images
from scheduler_svc.batch import ScheduledBatch, ScheduledSeq
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.request import Request, Status
from scheduler_svc.step_results import apply_decodes, apply_seqs


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


def _priority_key(r: Request) -> tuple[int, float]:
    return (-r.priority, r.arrival)


class Scheduler:
    def __init__(self, limits: SchedulerLimits, pool: BlockPool) -> None:
        self.limits = limits
        self.kv = KVCacheManager(pool, limits.block_size, limits.prefix_caching)
        self.waiting: list[Request] = []  # kept sorted by (priority desc, arrival)
        self.running: list[Request] = []
        self._ended: list[Request] = []  # finished or aborted since the last schedule()
        self.num_preemptions = 0
        self.finished_now: list[Request] = []  # finished by the last update(), in its order
        self.eos = frozenset(limits.eos_token_ids)
        self._running_sorted = True
        self._encoder_left = limits.max_encoder_tokens  # image tokens that may start encoding

    @property
    def pool(self) -> BlockPool:
        return self.kv.pool

    # ---- queue changes -------------------------------------------------------------------
    def add(self, req: Request) -> None:
        bisect.insort(self.waiting, req, key=_priority_key)

    def abort(self, req: Request) -> None:
        """Finish ``req`` now and give its blocks back (effective before the next step).

        The step loop keeps up to two steps in flight, so the worker may still be computing a
        step that writes these blocks when a later step hands them to another request. That is
        safe because the worker runs steps in order: the earlier step's writes land before the
        later step's, and the aborted request's result is dropped (it is finished).
        """
        if req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        req.aborted = True
        self.finish(req, common_pb2.FINISH_REASON_ABORT)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._ended)

    def load_tokens(self) -> int:
        """Tokens still to compute or generate: the load figure for placing new requests."""
        return sum(r.num_tokens - r.num_computed + r.params.max_tokens - len(r.output)
                   for r in (*self.waiting, *self.running))

    # ---- the decision --------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        self._age_waiting()
        batch = ScheduledBatch(ended=self._ended)
        self._ended = []
        self._encoder_left = self.limits.max_encoder_tokens
        budget, nseqs = self._schedule_running(batch)
        self._schedule_waiting(batch, budget, nseqs)
        return batch

    def schedule_joining(self, tokens: int, seqs: int) -> ScheduledBatch:
        """New requests only, for a step the worker may run inside one already sent that holds
        ``tokens`` tokens of ``seqs`` sequences (worker_svc.step_join): what is left of the budget.

        Nothing joins after an abort since that step was decided: the aborted request's blocks
        are free, and the step sent may still write them in the same pass as a joiner."""
        batch = ScheduledBatch()
        if self._ended:
            return batch
        self._schedule_waiting(batch, self.limits.max_num_batched_tokens - tokens, seqs,
                               only_new=True)
        return batch

    def _age_waiting(self) -> None:
        """With mixed priorities, let waiting requests climb with age so none waits forever."""
        aging = self.limits.priority_aging_s
        if aging <= 0 or len({r.priority for r in self.waiting}) < 2:
            return
        now = time.monotonic()
        self.waiting.sort(key=lambda r: (-(r.priority + (now - r.arrival) / aging), r.arrival))

    def _schedule_running(self, batch: ScheduledBatch) -> tuple[int, int]:
        """Running requests, highest priority / earliest first; victims come from the other end.
        Returns the token budget and sequence slots left (as slots used)."""
        budget = self.limits.max_num_batched_tokens
        max_seqs, max_len, bs = self.limits.max_num_seqs, self.limits.max_model_len, self.limits.block_size
        kv, running = self.kv, self._sorted_running()
        i = nseqs = 0
        # Bound once: the loop below runs once per running request.
        add_decode, add_position, add_block, add_index, add_epoch = batch.decode_columns()
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
                    if not kv.num_free:
                        victim = running[-1]
                        self._preempt(victim, batch)
                        if victim is req:
                            break
                        continue
                    block = kv.grow_one(req)
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
            if req.images and not (n := self._image_chunk(req, computed, n, not req.on_worker)):
                i += 1
                continue
            if not self._make_room(req, n, batch):
                break  # req itself was preempted: nothing after it can run either
            self._take(req, n, batch)
            budget -= n
            nseqs += 1
            i += 1
        return budget, nseqs

    def _sorted_running(self) -> list[Request]:
        if not self._running_sorted:
            self.running.sort(key=_priority_key)
            self._running_sorted = True
        return self.running

    def _make_room(self, req: Request, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Preempt from the back until ``req``'s chunk fits; False if ``req`` went itself."""
        while self.kv.blocks_needed(req, num_tokens) > self.kv.num_free:
            victim = self.running[-1]
            self._preempt(victim, batch)
            if victim is req:
                return False
        return True

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int, nseqs: int,
                          only_new: bool = False) -> None:
        """Waiting requests, in order, while budget, sequence slots and blocks last.
        ``only_new``: stop at one that has run before or has images to encode."""
        kv = self.kv
        while self.waiting and budget > 0 and nseqs < self.limits.max_num_seqs:
            req = self.waiting[0]
            if req in batch.preempted or req.pending:
                break  # preempted this step, or its last tokens are still in flight
            if only_new and (req.images or not req.unstarted):
                break
            hits = kv.cached_prefix(req)
            n = min(req.num_tokens - len(hits) * self.limits.block_size, budget)
            if not kv.can_admit(req, hits, n):
                break  # strict FCFS: do not let later requests jump a stuck one
            self.waiting.pop(0)
            kv.admit(req, hits)
            req.status = Status.RUNNING
            self.running.append(req)
            self._running_sorted = False
            n = min(req.num_tokens - req.num_computed, budget)
            if req.images and not (n := self._image_chunk(req, req.num_computed, n, True)):
                break  # admitted; its chunk runs from the running list next step
            self._take(req, n, batch)
            budget -= n
            nseqs += 1

    def _image_chunk(self, req: Request, start: int, n: int, first: bool) -> int:
        """How much of the chunk [start, start + n) runs within what is left of the step's
        encoder budget (``scheduler_svc.images``); 0: none of it this step."""
        n, cost = images.clip_chunk(req.images, start, n, self._encoder_left,
                                    self.limits.max_encoder_tokens, first)
        self._encoder_left -= cost
        return n

    def _preempt(self, victim: Request, batch: ScheduledBatch) -> None:
        self.running.remove(victim)
        self.kv.free(victim)
        victim.recompute()
        bisect.insort_left(self.waiting, victim, key=_priority_key)  # ahead of later arrivals
        batch.preempted.append(victim)
        self.num_preemptions += 1

    def _take(self, req: Request, num_tokens: int, batch: ScheduledBatch) -> None:
        new_blocks = self.kv.grow(req, num_tokens)
        start = req.num_computed
        req.num_computed += num_tokens
        sample = req.num_computed == req.num_tokens
        batch.seqs.append(ScheduledSeq(
            request=req, start=start, num_tokens=num_tokens, new_blocks=new_blocks,
            sample=sample, resend=not req.on_worker, epoch=req.epoch,
        ))
        req.on_worker = True
        if sample:
            req.pending += 1

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
        ended_before = len(self._ended)
        lps = iter(logprobs) if logprobs else itertools.repeat(None)
        apply_decodes(self, batch, tokens, lps, touched)
        apply_seqs(self, batch, iter(tokens[len(batch.decodes):]), lps, embeddings or {}, touched)
        self.finished_now = self._ended[ended_before:]
        return touched

    def finish(self, req: Request, reason: int) -> None:
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.kv.free(req)
        self._ended.append(req)

    # ---- requests moving in and out ------------------------------------------------------
    def restore(self, requests: list[Request]) -> None:
        """Take back requests reloaded from Redis; their block tables are already in the pool."""
        for req in requests:
            if not req.block_table:
                self.add(req)
                continue
            self.kv.restore(req)
            self.running.append(req)
            self._running_sorted = False

    def take_all(self) -> list[Request]:
        """Remove every request (the worker is lost): each gives up its blocks and recomputes."""
        reqs = sorted([*self.running, *self.waiting], key=_priority_key)
        for req in reqs:
            req.recompute()
            req.pending = 0
        self.running, self.waiting = [], []
        self.kv.reset(self.pool.num_blocks)
        return reqs

    def has_unstarted(self) -> bool:
        return any(r.unstarted for r in self.waiting)

    def take_unstarted(self) -> list[Request]:
        """Remove and return the waiting requests that have nothing here (the worker is
        draining): no output token, no block, no token in flight. Moving one elsewhere costs
        nothing -- at most a partial prefill computed before a preemption. A preempted request
        with output stays: it is work in flight, and recomputes here as it would have anyway."""
        moved = [r for r in self.waiting if r.unstarted]
        if moved:
            self.waiting = [r for r in self.waiting if not r.unstarted]
        for req in moved:
            req.recompute()
        return moved

    def check_invariants(self) -> None:
        self.kv.check([*self.running, *self.waiting])
