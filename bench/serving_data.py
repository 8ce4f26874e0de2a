"""The benchmark's request set: synthetic token-id prompts and their arrival times.

Prompts are random token ids rather than text so that input lengths are exact (no tokenizer in
the way) and the same set can be fed to pagewire and to transformers unchanged. Lengths follow
vLLM's random dataset: uniform over ``[len * (1 - r), len * (1 + r)]``. Everything is seeded, so
two runs, or two systems in one run, see the same requests in the same order.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from pagewire.model_dir import text_config

# Ids 0-4 are the test model's special tokens (BOS, EOS, PAD, <|im_start|>, <|im_end|>); a prompt
# made of ordinary ids keeps generation from being steered by, say, an end-of-turn marker.
FIRST_ORDINARY_ID = 5


@dataclass(frozen=True)
class BenchRequest:
    """One request: the prompt as token ids and exactly how many tokens it must generate. With
    ``images`` (encoded files) it is sent as a chat instead: the images, then ``text``."""

    prompt_ids: tuple[int, ...]
    output_len: int
    images: tuple[bytes, ...] = ()
    text: str = ""

    @property
    def input_len(self) -> int:
        return len(self.prompt_ids)  # for a chat, the client reads the exact count from usage


@dataclass(frozen=True)
class RequestSetSpec:
    """How to draw a request set (the CLI's length and prefix flags)."""

    num_requests: int
    input_len: int
    output_len: int
    input_len_range: float = 0.0
    output_len_range: float = 0.0
    shared_prefix_len: int = 0
    seed: int = 0


def length_bounds(length: int, ratio: float) -> tuple[int, int]:
    """Inclusive [low, high] for a length and a range ratio; never below 1."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {ratio}")
    low = max(1, math.floor(length * (1.0 - ratio)))
    high = max(low, math.ceil(length * (1.0 + ratio)))
    return low, high


def make_requests(spec: RequestSetSpec, vocab_size: int, round_: int = 0) -> list[BenchRequest]:
    """Draw the request set; a shared prefix is prepended to every prompt (and counts as input).

    Lengths and the shared prefix depend on the seed only; the rest of each prompt also depends
    on ``round_``. pagewire caches KV blocks by prefix, so a second run over the very same prompts
    would skip their prefill: each run draws a fresh round, same lengths, new tokens.
    """
    if vocab_size <= FIRST_ORDINARY_ID:
        raise ValueError(f"vocab_size {vocab_size} leaves no ordinary token ids")
    rng = np.random.default_rng(spec.seed)
    in_lo, in_hi = length_bounds(spec.input_len, spec.input_len_range)
    out_lo, out_hi = length_bounds(spec.output_len, spec.output_len_range)
    in_lens = rng.integers(in_lo, in_hi + 1, size=spec.num_requests)
    out_lens = rng.integers(out_lo, out_hi + 1, size=spec.num_requests)
    prefix = rng.integers(FIRST_ORDINARY_ID, vocab_size, size=spec.shared_prefix_len).tolist()
    body_rng = np.random.default_rng([spec.seed, round_])
    requests = []
    for n_in, n_out in zip(in_lens, out_lens, strict=True):
        body = body_rng.integers(FIRST_ORDINARY_ID, vocab_size, size=int(n_in)).tolist()
        requests.append(BenchRequest(tuple(prefix + body), int(n_out)))
    return requests


@dataclass
class RequestSource:
    """Hands out one fresh round of the request set per benchmark run (round 0: the warm-up's)."""

    spec: RequestSetSpec
    vocab_size: int
    rounds_drawn: int = 0
    images_per_request: int = 0
    image_size: tuple[int, int] = (336, 336)  # width, height
    last: list[BenchRequest] | None = None  # the latest round drawn

    def draw(self) -> list[BenchRequest]:
        self.rounds_drawn += 1
        self.last = self.round(self.rounds_drawn)
        return self.last

    def round(self, round_: int) -> list[BenchRequest]:
        requests = make_requests(self.spec, self.vocab_size, round_)
        if self.images_per_request:
            requests = with_images(requests, self.images_per_request, self.image_size,
                                   self.spec.seed, round_)
        return requests


def with_images(requests: list[BenchRequest], per_request: int, size: tuple[int, int],
                seed: int, round_: int) -> list[BenchRequest]:
    """The requests as image chats: ``per_request`` random PNGs of ``size`` each (new pixels per
    request and round), then the prompt's ids as words."""
    rng = np.random.default_rng([seed, round_, 7])
    out = []
    for r in requests:
        pngs = []
        for _ in range(per_request):
            buf = io.BytesIO()
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        out.append(replace(r, images=tuple(pngs), text=" ".join(f"w{t}" for t in r.prompt_ids)))
    return out


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: Poisson arrivals at ``rate``/s, or all at 0 (inf)."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0 (inf for a burst), got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed + 1).exponential(1.0 / rate, size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist() if n else []


def model_vocab_size(model_dir: str | Path) -> int:
    """The vocabulary size from the model's config.json (prompt ids are drawn below it)."""
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    return int(text_config(hf)["vocab_size"])
