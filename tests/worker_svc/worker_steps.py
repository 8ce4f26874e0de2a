"""Driving a ModelRunner as the scheduler does, and the transformers references it is held to.

:class:`Driver` is a scheduler without policy: chunked prefills, decodes (packed in a DecodeBatch or
as SequenceSteps that feed the worker's own last sample), blocks appended as positions need them,
and preemption by recompute (the sequence resent with its output tokens as input).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from pagewire.v1 import common_pb2, worker_pb2
from worker_svc.runner import ModelRunner

BS = 4  # tokens per block: small, so sequences cross block boundaries often


@dataclass
class Track:
    prompt: list[int]
    sampling: common_pb2.SamplingParams
    pooling: int = common_pb2.POOLING_NONE
    tell_prompt_len: bool = True  # False: leave SequenceStep.prompt_len 0 ("all of it is prompt")
    images: list[common_pb2.ImageInput] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.Logprobs] = field(default_factory=list)  # empty: none asked
    prompt_logprobs: list[worker_pb2.PromptLogprobs] = field(default_factory=list)
    embedding: list[float] | None = None
    blocks: list[int] = field(default_factory=list)
    fed: int = 0  # tokens in the worker's KV cache
    prefilling: bool = True  # feeding prompt (+ output, after a preemption) in chunks
    sent: bool = False  # the worker holds the sequence (it was sent ``new``)

    @property
    def known(self) -> list[int]:
        return self.prompt + self.output


class Driver:
    def __init__(self, runner: ModelRunner, packed: bool = True) -> None:
        self.runner, self.packed = runner, packed
        self.tracks: dict[int, Track] = {}
        self.next_block = itertools.count()
        self.release: list[int] = []
        self.step_id = 0
        runner.reset()

    def add(self, seq_id: int, prompt: list[int], sampling: common_pb2.SamplingParams,
            pooling: int = common_pb2.POOLING_NONE, tell_prompt_len: bool = True,
            images: list[common_pb2.ImageInput] | None = None) -> None:
        self.tracks[seq_id] = Track(list(prompt), sampling, pooling, tell_prompt_len,
                                    list(images or ()))

    def add_prefix_hit(self, seq_id: int, source: int, cached: int, prompt: list[int],
                       sampling: common_pb2.SamplingParams,
                       images: list[common_pb2.ImageInput] | None = None) -> None:
        """A sequence whose first ``cached`` tokens (whole blocks) are ``source``'s KV blocks,
        as the scheduler sends a prefix-cache hit: ``new`` from start_pos ``cached``."""
        assert cached % BS == 0 and prompt[:cached] == self.tracks[source].known[:cached]
        self.add(seq_id, prompt, sampling, images=images)
        t = self.tracks[seq_id]
        t.blocks, t.fed = self.tracks[source].blocks[: cached // BS], cached

    def preempt(self, seq_id: int) -> None:
        """The worker forgets the sequence; it is recomputed from prompt + output."""
        t = self.tracks[seq_id]
        t.fed, t.blocks, t.prefilling, t.sent = 0, [], True, False
        self.release.append(seq_id)

    def _grow(self, t: Track, upto: int) -> list[int]:
        """Blocks to append so the table covers positions < upto."""
        new = [next(self.next_block) for _ in range(-(-upto // BS) - len(t.blocks))]
        t.blocks.extend(new)
        return new

    def step(self, chunk: int = 1 << 30, only: set[int] | None = None) -> worker_pb2.StepResult:
        """One step over every unfinished sequence (or those in ``only``): the next ``chunk``
        tokens of a prefill, or one decode."""
        self.step_id += 1
        step = worker_pb2.Step(step_id=self.step_id, release_seq_ids=self.release)
        self.release = []
        for sid, t in self.tracks.items():
            if (only is not None and sid not in only) or (t.pooling and not t.prefilling):
                continue  # not asked for, or an embedding sequence past its prompt
            if t.prefilling:
                end = min(t.fed + chunk, len(t.known))
                new = self._grow(t, end)
                s = step.seqs.add(seq_id=sid, start_pos=t.fed, token_ids=t.known[t.fed:end],
                                  block_ids=t.blocks if not t.sent else new,
                                  sample=end == len(t.known), new=not t.sent,
                                  output_index=len(t.output))
                if not t.sent:
                    t.sent = True
                    s.sampling.CopyFrom(t.sampling)
                    s.pooling = t.pooling  # type: ignore[assignment]
                    s.prompt_len = len(t.prompt) if t.tell_prompt_len else 0
                    if t.sampling.HasField("structured"):  # as the scheduler sends them
                        s.output_ids.extend(t.output)
                    s.images.extend(t.images)
                t.fed, t.prefilling = end, end < len(t.known)
            else:
                new = self._grow(t, t.fed + 1)
                if self.packed:
                    d = step.decodes
                    d.seq_ids.append(sid)
                    d.positions.append(t.fed)
                    d.new_block_ids.append(new[0] if new else -1)
                    d.output_indices.append(len(t.output))
                else:
                    step.seqs.add(seq_id=sid, start_pos=t.fed, block_ids=new, sample=True,
                                  output_index=len(t.output))
                t.fed += 1
        result = self.runner.execute(step)
        assert not result.unknown_seq_ids
        for sid, tok in zip(result.seq_ids, result.token_ids, strict=True):
            self.tracks[sid].output.append(tok)
        assert len(result.logprobs) in (0, len(result.seq_ids)), "parallel to seq_ids, or none"
        for sid, lp in zip(result.seq_ids, result.logprobs, strict=False):
            self.tracks[sid].logprobs.append(lp)
        for chunk_lp in result.prompt_logprobs:
            self.tracks[chunk_lp.seq_id].prompt_logprobs.append(chunk_lp)
        for emb in result.embeddings:
            self.tracks[emb.seq_id].embedding = list(emb.values)
        return result

    def run(self, n_out: int, chunk: int = 1 << 30) -> dict[int, list[int]]:
        """Step until every generating sequence has n_out tokens (and every embedding its vector)."""
        def done(t: Track) -> bool:
            return t.embedding is not None if t.pooling else len(t.output) >= n_out

        while todo := {sid for sid, t in self.tracks.items() if not done(t)}:
            self.step(chunk, only=todo)
        return {sid: t.output for sid, t in self.tracks.items()}


def hf_logits(hf: AutoModelForCausalLM, ids: list[int]) -> Tensor:
    """Raw logits [len(ids), V] of every position."""
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


def hf_last_hidden(hf: AutoModelForCausalLM, ids: list[int]) -> Tensor:
    """Final hidden states (after the final norm) [len(ids), H]."""
    with torch.inference_mode():
        return hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].float()


def penalize(logits: Tensor, prompt: list[int], output: list[int], presence: float = 0.0,
             frequency: float = 0.0, repetition: float = 1.0) -> Tensor:
    """The penalties as documented in common.proto, token by token."""
    out = logits.clone()
    for tok in set(prompt) | set(output):
        out[tok] = out[tok] / repetition if out[tok] > 0 else out[tok] * repetition
    for tok, count in Counter(output).items():
        out[tok] -= frequency * count + presence
    return out
