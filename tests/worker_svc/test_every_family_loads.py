"""make-model --arch builds each family; each serves from its checkpoint and with dummy weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pagewire import cli
from pagewire.config import WorkerConfig
from pagewire.testmodel_arch import ARCHS
from pagewire.v1 import common_pb2, worker_pb2
from worker_svc.server import build_runner


def test_the_cli_and_the_builder_know_the_same_families() -> None:
    # llava, qwen2_5_vl: tests/pagewire/test_testmodel_vlm.py
    assert set(cli.ARCHS) == set(ARCHS) | {"llava", "qwen2_5_vl"}


def one_step(model_dir: Path, **kw: object) -> list[float]:
    runner, info = build_runner(WorkerConfig(model=str(model_dir), num_blocks=16, block_size=4,
                                             **kw))
    step = worker_pb2.Step(step_id=1)
    step.seqs.add(seq_id=1, token_ids=[0, 5, 9, 200], block_ids=[0, 1], sample=True, new=True,
                  sampling=common_pb2.SamplingParams(temperature=0.0, logprobs=2))
    result = runner.execute(step)
    assert len(result.token_ids) == 1
    lp = result.logprobs[0]
    return [lp.logprob, *lp.top_logprobs]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_make_model_arch_serves_from_checkpoint_and_as_dummy(arch: str, tmp_path: Path) -> None:
    cli.main(["make-model", str(tmp_path / "m"), "--arch", arch])
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (tmp_path / "m" / "tokenizer.json").exists() and hf["vocab_size"] == 1024
    assert torch.isfinite(torch.tensor(one_step(tmp_path / "m"))).all()
    shape = tmp_path / "shape"
    shape.mkdir()
    shutil.copy(tmp_path / "m" / "config.json", shape / "config.json")
    for dtype in ("float32", "bfloat16"):
        lp = one_step(shape, load_format="dummy", dtype=dtype)
        assert torch.isfinite(torch.tensor(lp)).all()
