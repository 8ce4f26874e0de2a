"""lm-eval-harness's ``local-completions`` model against a live stack: a small local
multiple-choice task (``lm_eval_task/``, no hub download), each choice's loglikelihood equal to
transformers' on the same model files within 1e-4 (float32).

lm-eval is not a pagewire dependency: it runs in its own Python, named by
``PAGEWIRE_LM_EVAL_PYTHON`` (a venv with ``pip install "lm-eval[api]"``; it needs transformers for the
tokenizer). Slow-marked: ``pytest -m slow tests/e2e/test_lm_eval.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from e2e_util import HFReference, launch

from pagewire.launcher import free_port

DRIVER = Path(__file__).resolve().parent / "lm_eval_driver.py"
LM_EVAL_PYTHON = os.environ.get("PAGEWIRE_LM_EVAL_PYTHON", "")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not LM_EVAL_PYTHON, reason="set PAGEWIRE_LM_EVAL_PYTHON to a Python with lm-eval"),
]


def loglikelihood(hf: HFReference, context: list[int], continuation: list[int]) -> float:
    ids = context + continuation
    with torch.inference_mode():
        rows = torch.log_softmax(hf.model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(rows[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))


def test_lm_eval_local_completions_loglikelihoods_equal_transformers(
    tiny_model: Path, tmp_path: Path, hf_reference: HFReference
) -> None:
    http_port = free_port()
    stack = launch(tiny_model, tmp_path / "logs", router_args=["--http-port", str(http_port)],
                   worker_args=["--num-blocks", "512", "--block-size", "16"])
    out = tmp_path / "lm_eval.json"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    try:
        subprocess.run(
            [LM_EVAL_PYTHON, str(DRIVER), f"http://127.0.0.1:{http_port}/v1",
             tiny_model.resolve().name, str(tiny_model), str(out)],
            check=True, env=env, cwd=tmp_path, timeout=600,
        )
    finally:
        stack.stop()
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert len(rows) == 17, "one request per choice of the five docs"
    for row in rows:
        expected = loglikelihood(hf_reference, row["context"], row["continuation"])
        assert row["loglikelihood"] == pytest.approx(expected, abs=1e-4), row
    assert 0.0 <= result["acc"] <= 1.0
