"""``make-model --arch llava`` / ``qwen2_5_vl``: directories transformers loads as a user's download."""

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


def test_make_model_qwen2_5_vl_loads_in_transformers_without_torchvision(tmp_path: Path) -> None:
    """AutoProcessor builds an images-only processor (no video processor, which would need
    torchvision) with Qwen's PIL image processor; the chat template writes Qwen's vision
    tokens; images of different sizes become different numbers of placeholders."""
    import vlm_cases

    from pagewire.testmodel_qwenvl import IMAGE_PAD, VISION_END, VISION_START

    cli.main(["make-model", str(tmp_path / "m"), "--arch", "qwen2_5_vl"])
    proc = AutoProcessor.from_pretrained(tmp_path / "m")
    assert type(proc.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert getattr(proc, "video_processor", None) is None
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    tok = proc.tokenizer
    assert proc.image_token == IMAGE_PAD
    assert tok.convert_tokens_to_ids(IMAGE_PAD) == model.config.image_token_id
    assert tok.convert_tokens_to_ids(VISION_START) == model.config.vision_start_token_id
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert VISION_START + IMAGE_PAD + VISION_END in text
    counts = {int(proc.image_processor(images=[vlm_cases.image(s)], return_tensors="np")
                  ["image_grid_thw"].prod()) // 4 for s in range(5)}
    assert len(counts) == 5 and 4 <= min(counts) and max(counts) <= 48


def test_qwen2_5_vl_serves_with_dummy_weights(tmp_path: Path) -> None:
    cli.main(["make-model", str(tmp_path / "m"), "--arch", "qwen2_5_vl"])
    runner, info = build_runner(WorkerConfig(model=str(tmp_path / "m"), num_blocks=16,
                                             block_size=4, load_format="dummy"))
    assert runner.model.vision is not None and runner.mrope is not None
    assert info.vocab_size == 1024 and runner.model.cfg.mrope_section == (4, 6, 6)
