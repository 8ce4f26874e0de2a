"""Decode batches padded to a captured size run over persistent buffers, as CUDA graphs replay
them; on the CPU the same padded path runs eagerly, so padding and buffer reuse are checked here.

The padded runner must give exactly the unpadded runner's tokens while the batch grows and
shrinks across sizes, with its persistent buffers poisoned before every step (garbage in every
id, row, position, KV slot, context length and block-table entry it keeps, NaN in its output) and
every KV block no sequence owns full of NaN: stale data from an earlier step must never be read,
and a padding row must never store K/V anywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from worker_steps import BS, Driver

from pagewire.config import WorkerConfig
from pagewire.v1 import common_pb2
from worker_svc.cuda_graphs import DecodeGraphs, capture_sizes
from worker_svc.runner import ModelRunner
from worker_svc.server import build_runner

GREEDY = common_pb2.SamplingParams(temperature=0.0)
SEEDED = common_pb2.SamplingParams(temperature=0.9, top_p=0.95, seed=5, logprobs=2)
PROMPTS = {i: [0, *range(3 * i + 1, 3 * i + 1 + 2 + (5 * i) % 11)] for i in range(1, 10)}
# Which sequences decode in each step: sizes 9, 3, 5, 1, 9, 2, 8 -> buckets 16, 4, 8, 1, 16, 2, 8.
SCHEDULE = [set(range(1, 10)), {1, 4, 7}, {2, 3, 5, 6, 9}, {8}, set(range(1, 10)), {1, 2},
            set(range(2, 10))]


def test_capture_sizes_cover_every_batch_up_to_the_limit() -> None:
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 32, *range(48, 257, 16)]
    assert capture_sizes(5) == [1, 2, 4, 8]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 48]


def make_runner(model: Path, padded: bool) -> ModelRunner:
    runner, _ = build_runner(WorkerConfig(model=str(model), num_blocks=256, block_size=BS,
                                          max_model_len=128))
    if padded:  # captured and replayed on a GPU, run eagerly over the same buffers on the CPU
        runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.backend,
                                     runner.device, BS, 128, max_num_seqs=16,
                                     capture=runner.device.type == "cuda")
    else:
        runner.graphs = None
    for k, v in runner.kv_caches:  # no block is written before a sequence owns it
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    return runner


def poison(graphs: DecodeGraphs) -> None:
    """Garbage that would corrupt the output if any of it survived into a step: real slots and
    blocks of other sequences, long contexts, out-of-range ids replaced by NaN where it can be."""
    g = torch.Generator().manual_seed(0)
    for buf in (graphs.small, graphs.ids, graphs.block_tables):
        buf.copy_(torch.randint(0, 40, buf.shape, generator=g, dtype=torch.int32))
    graphs.hidden.fill_(float("nan"))


def drive(runner: ModelRunner, packed: bool) -> tuple[dict[int, list[int]], list[list[int]]]:
    driver = Driver(runner, packed=packed)
    for sid, prompt in PROMPTS.items():
        driver.add(sid, prompt, SEEDED if sid % 3 == 0 else GREEDY)
    driver.step(chunk=6)  # prefills (several chunks each), eager
    while any(t.prefilling for t in driver.tracks.values()):
        driver.step(chunk=6, only={s for s, t in driver.tracks.items() if t.prefilling})
    for only in SCHEDULE * 2:
        if runner.graphs is not None:
            poison(runner.graphs)
        driver.step(only=only)
    top = [list(lp.top_token_ids) for lp in driver.tracks[3].logprobs]
    return {sid: t.output for sid, t in driver.tracks.items()}, top


@pytest.mark.parametrize("packed", [True, False], ids=["packed-decodes", "sequence-steps"])
def test_padded_decode_batches_give_the_unpadded_tokens(tiny_model: Path, packed: bool) -> None:
    plain = drive(make_runner(tiny_model, padded=False), packed)
    padded_runner = make_runner(tiny_model, padded=True)
    calls: list[int] = []
    run = padded_runner.graphs.run  # type: ignore[union-attr]

    def counting_run(*args: object) -> torch.Tensor:
        calls.append(args[1])  # type: ignore[arg-type]
        return run(*args)  # type: ignore[arg-type]

    padded_runner.graphs.run = counting_run  # type: ignore[method-assign,union-attr]
    padded = drive(padded_runner, packed)
    assert padded == plain
    assert sorted(set(calls)) == [1, 2, 3, 5, 8, 9], "every step of the schedule took the padded path"
    assert all(len(out) >= 7 for out in plain[0].values())


def test_batches_beyond_the_largest_size_run_unpadded(tiny_model: Path) -> None:
    runner = make_runner(tiny_model, padded=True)
    graphs = runner.graphs
    assert graphs is not None
    assert graphs.fits(16, 4) and not graphs.fits(17, 4) and not graphs.fits(4, 33)
    assert graphs.bucket(9) == 16 and graphs.bucket(16) == 16 and graphs.bucket(3) == 4
