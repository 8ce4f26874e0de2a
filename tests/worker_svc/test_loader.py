"""Building a model for serving: every tensor real on the device, and nothing imported that a
worker's start would wait seconds for."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from worker_svc.loader import load_model, read_model_dir


def test_every_parameter_and_buffer_is_real_storage_on_the_device(tiny_model: Path) -> None:
    model = load_model(read_model_dir(str(tiny_model)), torch.device("cpu"), torch.float32, 256)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert tensors and all(t.device.type == "cpu" for _, t in tensors)
    assert all(t.dtype == torch.float32 for _, t in tensors)
    rope = dict(model.named_buffers())["rope_full_attention"]
    half = rope.shape[1] // 2  # position 0: cos 1, sin 0
    assert rope.shape[0] == 256 and torch.equal(rope[0], torch.cat([torch.ones(half), torch.zeros(half)]))


def test_building_a_model_imports_neither_dynamo_nor_sympy(tiny_model: Path) -> None:
    """torch's layers initialise their weights through torch._dynamo's no-compile wrapper, and
    ``Module.to_empty`` of a meta model goes through sympy's symbolic shapes: 1.3 + 1.4 s of a
    worker's start on this machine, for tensors the checkpoint overwrites."""
    script = textwrap.dedent(f"""
        import sys, torch
        from worker_svc.loader import load_model, read_model_dir
        load_model(read_model_dir({str(tiny_model)!r}), torch.device("cpu"), torch.float32, 256)
        print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stderr
