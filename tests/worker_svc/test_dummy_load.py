"""--load-format dummy: random weights shaped by config.json alone, finite in half precision."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pagewire.config import WorkerConfig
from pagewire.v1 import common_pb2, worker_pb2
from worker_svc.loader import load_model, read_model_dir
from worker_svc.server import build_runner


def config_only(tiny_model: Path, dest: Path, **overrides: int) -> Path:
    """A model directory with nothing but config.json (no weights, no tokenizer)."""
    dest.mkdir()
    shutil.copy(tiny_model / "config.json", dest / "config.json")
    if overrides:
        cfg = json.loads((dest / "config.json").read_text())
        cfg.update(overrides)
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_dummy_weights_need_only_config_json(tiny_model: Path, tmp_path: Path) -> None:
    model_dir = config_only(tiny_model, tmp_path / "shape")
    cfg = WorkerConfig(model=str(model_dir), load_format="dummy", num_blocks=16, block_size=4)
    runner, info = build_runner(cfg)
    assert info.vocab_size == 1024 and [p.name for p in model_dir.iterdir()] == ["config.json"]
    step = worker_pb2.Step(step_id=1)
    step.seqs.add(seq_id=1, token_ids=[0, 5, 9, 200], block_ids=[0, 1], sample=True, new=True,
                  sampling=common_pb2.SamplingParams(temperature=1.0, seed=3, logprobs=2))
    result = runner.execute(step)
    assert len(result.token_ids) == 1 and torch.isfinite(torch.tensor(result.logprobs[0].logprob))


def test_the_checkpoint_format_still_needs_the_weights(tiny_model: Path, tmp_path: Path) -> None:
    files = read_model_dir(config_only(tiny_model, tmp_path / "shape"))
    with pytest.raises(FileNotFoundError):
        load_model(files, torch.device("cpu"), torch.float32, 64)


def test_dummy_weights_are_the_same_on_every_load(tiny_model: Path, tmp_path: Path) -> None:
    files = read_model_dir(config_only(tiny_model, tmp_path / "shape"))
    a = load_model(files, torch.device("cpu"), torch.float32, 64, load_format="dummy")
    b = load_model(files, torch.device("cpu"), torch.float32, 64, load_format="dummy")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_deep_dummy_model_stays_finite_in_half_precision(
    tiny_model: Path, tmp_path: Path, dtype: torch.dtype
) -> None:
    """As deep as Llama-3-8B (32 layers): activations and logits stay finite and O(1)."""
    model_dir = config_only(tiny_model, tmp_path / "deep", num_hidden_layers=32)
    name = str(dtype).removeprefix("torch.")
    cfg = WorkerConfig(model=str(model_dir), load_format="dummy", dtype=name, num_blocks=32,
                       block_size=4)
    runner, _ = build_runner(cfg)
    step = worker_pb2.Step(step_id=1)
    step.seqs.add(seq_id=1, token_ids=list(range(0, 1000, 37)), block_ids=list(range(8)),
                  sample=True, new=True, sampling=common_pb2.SamplingParams(logprobs=0))
    result = runner.execute(step)
    logprob = result.logprobs[0].logprob
    assert -20 < logprob < 0, "finite, and not a one-hot distribution from exploded logits"


def test_a_context_longer_than_the_model_was_trained_for_is_refused(tiny_model: Path,
                                                                    tmp_path: Path) -> None:
    model_dir = config_only(tiny_model, tmp_path / "shape", max_position_embeddings=256)
    cfg = WorkerConfig(model=str(model_dir), load_format="dummy", num_blocks=16, max_model_len=512)
    with pytest.raises(SystemExit, match="--max-model-len 512 exceeds the model's max_position_embeddings 256"):
        build_runner(cfg)
