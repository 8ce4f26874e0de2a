"""``make-model --arch llava``: a directory transformers loads as a user's LLaVA download."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from pagewire import cli
from pagewire.config import WorkerConfig
from pagewire.testmodel_vlm import IMAGE_TOKEN
from worker_svc.server import build_runner


def test_make_model_llava_loads_in_transformers_with_a_pil_processor(tmp_path: Path) -> None:
    cli.main(["make-model", str(tmp_path / "m"), "--arch", "llava"])
    proc = AutoProcessor.from_pretrained(tmp_path / "m")
    assert type(proc.image_processor).__name__.endswith("Pil")  # no torchvision needed
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    image_id = proc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == model.config.image_token_id
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text.count(IMAGE_TOKEN) == 1


def test_llava_serves_with_dummy_weights(tmp_path: Path) -> None:
    cli.main(["make-model", str(tmp_path / "m"), "--arch", "llava"])
    runner, info = build_runner(WorkerConfig(model=str(tmp_path / "m"), num_blocks=16,
                                             block_size=4, load_format="dummy"))
    assert runner.model.vision is not None and info.vocab_size == 1024
    assert json.loads((tmp_path / "m" / "config.json").read_text())["text_config"]


def test_same_seed_same_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    for d in ("a", "b"):
        cli.main(["make-model", str(tmp_path / d), "--arch", "llava", "--seed", "3"])
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
