"""What a prefill chunk yields besides a sampled token: prompt logprobs and pooled embeddings.

Both read the final hidden state of every position of a chunk (a plain step keeps only each
sequence's last), and both carry state across a chunked prefill on the sequence's SeqExtras:
prompt logprobs keep the chunk's last hidden state, because the logprob of the next chunk's first
token comes from it; pooling keeps a running float32 sum (MEAN) or the last state (LAST). Mean
pooling needs every prompt position, so its sequences must not start from a cached prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pagewire.v1 import common_pb2, worker_pb2
from worker_svc.logits import logprob_protos
from worker_svc.seq_table import SeqExtras, SequenceTable

LOGITS_ELEMENTS = 1 << 25  # prompt logits are computed in slices of at most this many floats


@dataclass
class Chunk:
    """One SequenceStep of the step as the model saw it."""

    seq_id: int
    extras: SeqExtras
    start: int  # position of the first token
    offset: int  # index of the first token in the step's hidden states
    token_ids: Sequence[int]
    sample: bool


def prompt_end(chunk: Chunk) -> int:
    """Tokens of the sequence that are prompt. Unknown (sent without a prompt length) until the
    first sample: everything fed so far, and more to come."""
    p = chunk.extras.prompt_len
    return chunk.start + len(chunk.token_ids) if p is None else p


def prompt_logprobs(
    chunks: Sequence[Chunk], hidden: Tensor, logits: Callable[[Tensor], Tensor], vocab_size: int
) -> list[worker_pb2.PromptLogprobs]:
    """Logprobs of the prompt tokens each chunk fed (index 0 has none): the entry for prompt index
    i reads the hidden state of position i - 1, from this chunk or kept from the previous one."""
    sources: list[Tensor] = []
    targets: list[int] = []
    entries: list[tuple[Chunk, int, int]] = []  # chunk, first prompt index, count
    for c in chunks:
        e, n = c.extras, len(c.token_ids)
        end = prompt_end(c)
        # The hidden state of position start - 1, kept by the previous chunk. Missing when that
        # position was never computed here (a cached prefix): its entry cannot be given.
        held = e.prompt_hidden if c.start > 0 else None
        lo = max(c.start if held is not None else c.start + 1, 1)
        hi = min(c.start + n, end)
        if hi > lo:
            if held is not None:
                sources.append(held.unsqueeze(0))
            sources.append(hidden[c.offset : c.offset + hi - 1 - c.start])
            targets.extend(c.token_ids[lo - c.start : hi - c.start])
            entries.append((c, lo, hi - lo))
        more = e.prompt_len is None or c.start + n < end
        e.prompt_hidden = hidden[c.offset + n - 1].clone() if more else None
    if not entries:
        return []
    src = torch.cat(sources)
    tgt = torch.tensor(targets, dtype=torch.int64, device=src.device)
    tops = [int(c.extras.params.prompt_logprobs or 0) for c, _, k in entries for _ in range(k)]
    step = max(1, LOGITS_ELEMENTS // vocab_size)
    protos: list[common_pb2.Logprobs] = []
    for i in range(0, len(src), step):
        lp = logits(src[i : i + step]).log_softmax(dim=-1)
        protos.extend(logprob_protos(lp, tgt[i : i + step], tops[i : i + step]))
    out, at = [], 0
    for c, lo, k in entries:
        out.append(worker_pb2.PromptLogprobs(seq_id=c.seq_id, start_index=lo,
                                             positions=protos[at : at + k]))
        at += k
    return out


def pool(chunks: Sequence[Chunk], hidden: Tensor) -> list[worker_pb2.Embedding]:
    """Fold each chunk's hidden states into its sequence's pooling; after the last chunk (the one
    that samples), the pooled vector."""
    out = []
    for c in chunks:
        e, n = c.extras, len(c.token_ids)
        h = hidden[c.offset : c.offset + n].float()
        if e.pooling == common_pb2.POOLING_MEAN:
            total = h.sum(dim=0)
            e.pooled = total if e.pooled is None else e.pooled + total
            e.pooled_count += n
        else:
            e.pooled, e.pooled_count = h[-1].clone(), 1
        if c.sample and e.pooled is not None:
            values = (e.pooled / e.pooled_count).tolist()
            out.append(worker_pb2.Embedding(seq_id=c.seq_id, values=values))
            e.pooled, e.pooled_count = None, 0
    return out


def add_to_result(
    table: SequenceTable,
    seqs: Sequence[worker_pb2.SequenceStep],
    rows: np.ndarray,
    offsets: np.ndarray,
    hidden: Tensor,
    logits: Callable[[Tensor], Tensor],
    vocab_size: int,
    result: worker_pb2.StepResult,
) -> None:
    """Prompt logprobs and pooling of the step's chunks that ask (``rows``: their table rows,
    ``offsets``: their first token's index in ``hidden``), added to ``result``."""
    logprob_chunks, pool_chunks = [], []
    for i, s in enumerate(seqs):
        e = table.extra(rows[i])
        wants_lp = e.params.prompt_logprobs is not None
        if s.token_ids and (wants_lp or e.pooling != common_pb2.POOLING_NONE):
            c = Chunk(s.seq_id, e, s.start_pos, int(offsets[i]), s.token_ids, s.sample)
            if wants_lp and (e.prompt_len is None or s.start_pos < e.prompt_len):
                logprob_chunks.append(c)
            if e.pooling != common_pb2.POOLING_NONE:
                pool_chunks.append(c)
    if logprob_chunks:
        result.prompt_logprobs.extend(prompt_logprobs(logprob_chunks, hidden, logits, vocab_size))
    if pool_chunks:
        result.embeddings.extend(pool(pool_chunks, hidden))
