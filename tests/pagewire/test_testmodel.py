"""The self-built test model: reproducible, loadable offline, and a sharp greedy oracle."""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from pagewire.testmodel import SIZES, STAMP_NAME, ensure_model, make_model
from pagewire.testmodel_tokenizer import BOS, EOS, IM_END, IM_START

PROMPTS = (
    "The harbour at low tide",
    "def fibonacci(n):",
    "Bonjour, où est la gare ?",
    "中文：早上好。",
    "1 2 3 4 5 6 7 8",
    "Once upon a time there was a lighthouse keeper who",
    "Q: Why is the sky blue?\nA:",
    "🙂 emoji test ✨ and more",
)
STEPS = 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"), seed=0, size="tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def greedy_runs(
    model: PreTrainedModel, tokenizer: AutoTokenizer
) -> list[tuple[list[int], torch.Tensor]]:
    """(continuation, per-step logits) for each prompt; shared by the oracle-quality tests."""
    return [greedy(model, tokenizer(p).input_ids, STEPS) for p in PROMPTS]


def greedy(model: PreTrainedModel, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Plain argmax loop over full forwards: no cache and no stop tokens, so every run is STEPS long."""
    seq = torch.tensor([ids])
    all_logits = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(seq).logits[0, -1]
            all_logits.append(logits)
            seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
    return seq[0, len(ids) :].tolist(), torch.stack(all_logits)


def file_hashes(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def test_same_seed_gives_byte_identical_files(tiny_dir: Path, tmp_path: Path) -> None:
    again = make_model(tmp_path / "again", seed=0, size="tiny")
    hashes = file_hashes(tiny_dir)
    assert STAMP_NAME in hashes and "model.safetensors" in hashes
    assert file_hashes(again) == hashes


def test_different_seed_gives_different_weights(tiny_dir: Path, tmp_path: Path) -> None:
    other = make_model(tmp_path / "other", seed=1, size="tiny")
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert not any(torch.equal(a[k], b[k]) for k in a if not k.endswith("norm.weight"))
    # The tokenizer depends on the size only: the corpus is fixed.
    assert file_hashes(other)["tokenizer.json"] == file_hashes(tiny_dir)["tokenizer.json"]


def test_loads_with_no_missing_or_unexpected_weights(tiny_dir: Path) -> None:
    _, info = AutoModelForCausalLM.from_pretrained(
        tiny_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_config_is_llama_of_the_requested_size(tiny_dir: Path, model: PreTrainedModel) -> None:
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    shape = SIZES["tiny"]
    assert model.config.hidden_size == shape.hidden_size == 128
    assert model.config.num_key_value_heads == 2 and model.config.head_dim == 32
    assert model.lm_head.weight.shape == (shape.vocab_size, shape.hidden_size)
    assert model.dtype == torch.float32


def test_tokenizer_covers_exactly_the_model_vocab(tokenizer: AutoTokenizer) -> None:
    # Any id the model can pick must decode.
    assert len(tokenizer) == SIZES["tiny"].vocab_size


def test_tokenizer_prepends_bos_and_declares_specials(tokenizer: AutoTokenizer) -> None:
    ids = tokenizer("hello world").input_ids
    assert ids[0] == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids(BOS)
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token == EOS and tokenizer.pad_token_id is not None
    assert tokenizer("hello world", add_special_tokens=False).input_ids == ids[1:]


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading spaces\n\ttabs",
        "Héllo wörld — façade, Straße",
        "中文：早上好 日本語 한국어",
        "🙂👩‍💻🇯🇵 ∑√∞",
    ],
)
def test_tokenizer_round_trips_text(tokenizer: AutoTokenizer, text: str) -> None:
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids).startswith(BOS)


def test_chat_template_renders_chatml_with_generation_prompt(tokenizer: AutoTokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"{BOS}{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nHi{IM_END}\n{IM_START}assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_tokens_to_ids(IM_END) in ids
    plain = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not plain.endswith(f"{IM_START}assistant\n")


def test_greedy_continuations_vary_across_prompts(
    greedy_runs: list[tuple[list[int], torch.Tensor]],
) -> None:
    continuations = [tuple(c) for c, _ in greedy_runs]
    assert len(set(continuations)) == len(PROMPTS)
    for c in continuations:
        assert len(set(c)) >= 8, c  # not collapsed into one repeated token or a short loop


def test_top2_logit_gap_is_wide_against_fp32_rounding(
    tiny_dir: Path, tokenizer: AutoTokenizer, greedy_runs: list[tuple[list[int], torch.Tensor]]
) -> None:
    """The gap to the runner-up must dwarf fp32 vs fp64 differences, or the oracle is flaky."""
    gaps = torch.cat([(lg.topk(2).values[:, 0] - lg.topk(2).values[:, 1]) for _, lg in greedy_runs])
    assert statistics.median(gaps.tolist()) > 0.5
    model64 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    worst = 0.0
    for prompt, (cont, logits32) in zip(PROMPTS, greedy_runs, strict=True):
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            logits64 = model64(torch.tensor([ids + cont])).logits[0, len(ids) - 1 : -1]
        assert logits64.argmax(-1).tolist() == cont
        worst = max(worst, (logits32.double() - logits64).abs().max().item())
    assert gaps.min().item() > 20 * worst


def test_changing_an_early_token_changes_later_output(
    model: PreTrainedModel, tokenizer: AutoTokenizer
) -> None:
    ids = tokenizer("The harbour at low tide was quiet and the boats").input_ids
    altered = list(ids)
    altered[1] = 500 if ids[1] != 500 else 501
    a, _ = greedy(model, ids, 16)
    b, _ = greedy(model, altered, 16)
    assert sum(x != y for x, y in zip(a, b, strict=True)) >= 8


def test_positions_change_the_prediction(model: PreTrainedModel, tokenizer: AutoTokenizer) -> None:
    """A RoPE or position-id bug must show up as different argmaxes, not just tiny logit drift."""
    ids = torch.tensor([tokenizer("The harbour at low tide was quiet and the boats").input_ids])
    n = ids.shape[1]
    with torch.no_grad():
        right = model(ids).logits[0].argmax(-1)
        wrong = model(ids, position_ids=torch.zeros(1, n, dtype=torch.long)).logits[0].argmax(-1)
    assert (right != wrong).sum().item() >= n // 3


def test_ensure_model_builds_only_when_missing_or_different(tmp_path: Path) -> None:
    d = ensure_model(tmp_path / "m", seed=3)
    weights = d / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_model(d, seed=3) == d
    assert weights.stat().st_mtime_ns == before
    ensure_model(d, seed=4)
    assert json.loads((d / STAMP_NAME).read_text())["seed"] == 4
    (d / "tokenizer.json").unlink()
    ensure_model(d, seed=4)
    assert (d / "tokenizer.json").is_file()
    assert not [f for f in d.iterdir() if f.name.startswith(".staging")]


def test_unknown_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown size"):
        make_model(tmp_path, size="huge")


def test_small_builds_and_loads_with_its_shape(tmp_path: Path) -> None:
    d = make_model(tmp_path / "small", seed=0, size="small")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    shape = SIZES["small"]
    assert model.config.num_hidden_layers == shape.num_hidden_layers == 8
    assert model.config.num_key_value_heads == 4 and model.config.head_dim == 64
    assert 25_000_000 < sum(p.numel() for p in model.parameters()) < 40_000_000
    tokenizer = AutoTokenizer.from_pretrained(d)
    assert len(tokenizer) == shape.vocab_size
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer("The night train").input_ids])).logits
    assert logits.shape[-1] == shape.vocab_size
