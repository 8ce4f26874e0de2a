"""The runner under test and transformers' model on the same weights (the reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from worker_steps import BS

from pagewire.config import WorkerConfig
from worker_svc.runner import ModelRunner
from worker_svc.server import build_runner


@pytest.fixture(scope="module")
def runner(tiny_model: Path) -> ModelRunner:
    r, info = build_runner(WorkerConfig(model=str(tiny_model), num_blocks=512, block_size=BS))
    assert info.num_blocks == 512
    return r


@pytest.fixture(scope="module")
def hf(tiny_model: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
