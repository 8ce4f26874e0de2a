"""Logits processing before the draw, and log-probabilities, batched over the sampling rows.

vLLM's order: repetition, frequency and presence penalties, then OpenAI's logit_bias (added), then
vLLM's allowed_token_ids (every other token masked) and bad_words (banned), then min_tokens (stop tokens masked, so a
bias cannot lift a masked token back), then the sampler's temperature, top-k, top-p and min-p
(worker_svc/sampler.py). Each stage runs on
the rows that need it and only when some row does, so a plain batch pays nothing for it.
Log-probabilities are vLLM's default: the log-softmax of the raw model logits, taken before any of
this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pagewire.v1 import common_pb2


def pad_ids(arrays: Sequence[np.ndarray], pad: int) -> np.ndarray:
    """Rows of token ids padded to one width with ``pad``; negative (unknown) ids become ``pad``."""
    width = max(1, max((len(a) for a in arrays), default=0))
    out = np.full((len(arrays), width), pad, dtype=np.int64)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    out[out < 0] = pad
    return out


@dataclass
class Penalties:
    """The penalized rows of a sampling batch, with their prompt and output token ids."""

    rows: Tensor  # [P] int64: rows of the batch's logits
    prompt_ids: Tensor  # [P, Lp] int64, padded with the vocab size (a column that is cut off)
    output_ids: Tensor  # [P, Lo] int64, padded likewise
    presence: Tensor  # [P] float32
    frequency: Tensor  # [P] float32
    repetition: Tensor  # [P] float32

    @classmethod
    def build(
        cls,
        rows: np.ndarray,
        prompts: Sequence[np.ndarray],
        outputs: Sequence[np.ndarray],
        presence: np.ndarray,
        frequency: np.ndarray,
        repetition: np.ndarray,
        vocab_size: int,
        device: torch.device,
    ) -> Penalties:
        def put(a: np.ndarray) -> Tensor:
            return torch.from_numpy(a).to(device, non_blocking=True)

        return cls(
            rows=put(rows.astype(np.int64)),
            prompt_ids=put(pad_ids(prompts, vocab_size)),
            output_ids=put(pad_ids(outputs, vocab_size)),
            presence=put(presence.astype(np.float32)),
            frequency=put(frequency.astype(np.float32)),
            repetition=put(repetition.astype(np.float32)),
        )


def apply_penalties(logits: Tensor, pen: Penalties) -> None:
    """In place on logits [S, V]: repetition over prompt + output tokens (a positive logit is
    divided by it, a negative one multiplied), then frequency * count and presence * [count > 0]
    subtracted over output tokens.

    Only the logits of tokens in a row's ids change, so the work is sparse: gather them, compute,
    scatter back, in a copy of the rows with one spare column that the padding ids point at. A token
    listed twice reads the same value and writes the same result, so repeated ids are harmless for
    repetition and presence (applied once); frequency is a scatter_add, once per occurrence.
    """
    rows, vocab = len(pen.rows), logits.shape[1]
    work = logits.new_empty(rows, vocab + 1)
    work[:, :vocab] = logits.index_select(0, pen.rows)
    seen = torch.cat([pen.prompt_ids, pen.output_ids], dim=1)
    vals, rep = work.gather(1, seen), pen.repetition.unsqueeze(1)
    work.scatter_(1, seen, torch.where(vals > 0, vals / rep, vals * rep))
    freq = (-pen.frequency).unsqueeze(1).expand(pen.output_ids.shape).contiguous()
    work.scatter_add_(1, pen.output_ids, freq)
    vals = work.gather(1, pen.output_ids)
    work.scatter_(1, pen.output_ids, vals - pen.presence.unsqueeze(1))
    logits.index_copy_(0, pen.rows, work[:, :vocab])


def mask_tokens(logits: Tensor, rows: np.ndarray, ids: Sequence[np.ndarray]) -> None:
    """In place: logits[rows[i], ids[i]] = -inf (min_tokens: stop tokens cannot be drawn yet)."""
    lens = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
    if not lens.any():
        return
    # Non-blocking copies and a filled scalar: nothing here waits for the device.
    r = torch.from_numpy(np.repeat(rows.astype(np.int64), lens)).to(logits.device, non_blocking=True)
    c = torch.from_numpy(np.concatenate(ids)).to(logits.device, non_blocking=True)
    logits.index_put_((r, c), torch.full((), float("-inf"), device=logits.device))


def bias_tokens(
    logits: Tensor, rows: np.ndarray, ids: Sequence[np.ndarray], biases: Sequence[np.ndarray]
) -> None:
    """In place: logits[rows[i], ids[i][j]] += biases[i][j] (logit_bias), as one sparse
    scatter over the whole batch: the work is the number of biased entries, never the vocabulary.
    A row's ids are distinct (a map's keys), so no entry is added twice."""
    lens = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
    if not lens.any():
        return
    r = torch.from_numpy(np.repeat(rows.astype(np.int64), lens)).to(logits.device, non_blocking=True)
    c = torch.from_numpy(np.concatenate(ids)).to(logits.device, non_blocking=True)
    v = torch.from_numpy(np.concatenate(biases)).to(logits.device, non_blocking=True)
    logits.index_put_((r, c), v.to(logits.dtype), accumulate=True)


def allow_only(logits: Tensor, rows: np.ndarray, ids: Sequence[np.ndarray]) -> None:
    """In place: every logit of row ``rows[i]`` but those of ``ids[i]`` becomes -inf
    (allowed_token_ids). One scatter builds the keep-mask of all restricted rows at once and one
    masked fill applies it: the work is the restricted rows times the vocabulary, on the device."""
    lens = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
    r = torch.from_numpy(np.repeat(np.arange(len(ids)), lens)).to(logits.device, non_blocking=True)
    c = torch.from_numpy(np.concatenate(ids)).to(logits.device, non_blocking=True)
    keep = torch.zeros(len(ids), logits.shape[1], dtype=torch.bool, device=logits.device)
    keep.index_put_((r, c), torch.ones((), dtype=torch.bool, device=logits.device))
    at = torch.from_numpy(rows.astype(np.int64)).to(logits.device, non_blocking=True)
    logits.index_copy_(0, at, logits.index_select(0, at).masked_fill(~keep, float("-inf")))


def banned_ids(words: Sequence[tuple[int, ...]], output: np.ndarray) -> np.ndarray:
    """vLLM's bad words: the last token of each word whose other tokens end the output so far
    (a one-token word: always). A loop over the row's words, not over the vocabulary."""
    tail = output.tolist()[-max(len(w) for w in words) :] if len(output) else []
    banned = [w[-1] for w in words
              if len(w) == 1 or (len(tail) >= len(w) - 1 and tail[len(tail) - len(w) + 1 :]
                                 == list(w[:-1]))]
    return np.asarray(banned, dtype=np.int64)


def logprob_protos(
    logprobs: Tensor, token_ids: Tensor, num_top: Sequence[int]
) -> list[common_pb2.Logprobs]:
    """One entry per row of log-softmaxed ``logprobs`` [R, V]: token_ids[i]'s log-probability
    and rank (1 + how many tokens are strictly more likely), and the row's num_top[i] best."""
    if len(num_top) == 0:
        return []
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=1) + 1
    top_lp, top_ids = logprobs.topk(min(max(num_top), logprobs.shape[1]), dim=1)
    ids_l, lp_l, rank_l = token_ids.tolist(), chosen.squeeze(1).tolist(), ranks.tolist()
    top_ids_l, top_lp_l = top_ids.tolist(), top_lp.tolist()
    return [
        common_pb2.Logprobs(
            token_id=ids_l[i],
            logprob=lp_l[i],
            rank=rank_l[i],
            top_token_ids=top_ids_l[i][:n],
            top_logprobs=top_lp_l[i][:n],
        )
        for i, n in enumerate(num_top)
    ]
