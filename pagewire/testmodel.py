"""A self-built test model: a Llama with random weights, in Hugging Face layout.

Tests and benchmarks need a model that transformers can load offline (nothing may come from a
model hub) and that makes a sharp oracle: the server's greedy tokens are compared token for token
with transformers' ``generate``. So the random init is tuned rather than default: the top-2 logit
gap is wide enough that fp32 rounding between two correct implementations does not flip the
argmax, and continuations depend on the whole context through attention, so a bug in positions,
the KV cache or masking changes the output. Same (seed, size) gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pagewire.testmodel_tokenizer import (
    BOS,
    EOS,
    IM_END,
    PAD,
    SPECIAL_TOKENS,
    train_tokenizer,
    write_json,
    write_tokenizer_files,
)

# Bump when the files a (seed, size) produces change, so ensure_model rebuilds stale copies.
FORMAT_VERSION = 1
STAMP_NAME = "pagewire_testmodel.json"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

# Init scales, as multiples of 1/sqrt(fan_in) (embedding: absolute); norms are 1.0. Tuned by
# measurement (tests/pagewire/test_testmodel.py pins the outcome). q/k gain 1.5 makes attention
# sharp enough that zeroing position ids flips most argmaxes and an early token changes the whole
# continuation; higher gains grew fp32 rounding noise faster than they helped. o gain 1.5 keeps the
# residual stream from being a function of the last token alone. The lm_head gain gives logits a
# std of ~6, so softmax is peaked like a trained model's (median top-1 probability ~0.5) and
# top-2 gaps are ~1 in absolute terms; argmax robustness itself is scale-free, and measures as
# the smallest top-2 gap staying hundreds of times above the fp32-vs-fp64 logit difference.
EMBED_STD = 1.0
QK_GAIN = 1.5
V_GAIN = 1.0
O_GAIN = 1.5
MLP_GAIN = 1.0
LM_HEAD_GAIN = 6.0


@dataclass(frozen=True)
class ModelShape:
    """The Llama hyperparameters that differ between sizes."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 4096


SIZES: dict[str, ModelShape] = {
    # Loads and runs in well under a second on CPU: the default for unit and e2e tests.
    "tiny": ModelShape(1024, 128, 4, 4, 2, 32, 352),
    # Big enough that compute, not overhead, dominates on CPU; still builds in seconds.
    "small": ModelShape(4096, 512, 8, 8, 4, 64, 1408),
}


def make_model(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Write the test model for (seed, size) into ``out_dir`` and return it.

    Each file is written under a temporary name and renamed into place, and the stamp goes last,
    so a concurrent or interrupted build never leaves a directory that looks complete.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    shape = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(shape.vocab_size)
    with _staging(out) as stage:
        write_tokenizer_files(tok, stage, shape.max_position_embeddings)
        write_json(stage / "config.json", hf_config(shape))
        write_json(stage / "generation_config.json", generation_config())
        save_file(init_weights(shape, seed), str(stage / "model.safetensors"), {"format": "pt"})
    write_json(out / STAMP_NAME, _stamp(seed, size))
    return out


def ensure_model(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Return ``out_dir`` holding the (seed, size) model, building it only if it is missing.

    Cheap when the model is there (one small JSON read), so launchers and tests call it freely.
    """
    out = Path(out_dir)
    try:
        stamp = json.loads((out / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stamp = None
    complete = all((out / name).is_file() for name in MODEL_FILES)
    if stamp == _stamp(seed, size) and complete:
        return out
    return make_model(out, seed=seed, size=size)


def hf_config(shape: ModelShape) -> dict[str, object]:
    """config.json for LlamaForCausalLM; no transformers version, so files match across installs."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_key_value_heads,
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }


def generation_config() -> dict[str, object]:
    """Greedy by default; generation ends at end-of-text or at the end of a chat turn."""
    return {
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "do_sample": False,
        "eos_token_id": [SPECIAL_TOKENS.index(EOS), SPECIAL_TOKENS.index(IM_END)],
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
    }


def init_weights(shape: ModelShape, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights named exactly as transformers' Llama names them."""
    d, inter = shape.hidden_size, shape.intermediate_size
    q_dim = shape.num_attention_heads * shape.head_dim
    kv_dim = shape.num_key_value_heads * shape.head_dim
    w = {
        "model.embed_tokens.weight": _normal(
            seed, "model.embed_tokens.weight", (shape.vocab_size, d), EMBED_STD
        )
    }
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, out_f, in_f, gain in (
            ("self_attn.q_proj", q_dim, d, QK_GAIN),
            ("self_attn.k_proj", kv_dim, d, QK_GAIN),
            ("self_attn.v_proj", kv_dim, d, V_GAIN),
            ("self_attn.o_proj", d, q_dim, O_GAIN),
            ("mlp.gate_proj", inter, d, MLP_GAIN),
            ("mlp.up_proj", inter, d, MLP_GAIN),
            ("mlp.down_proj", d, inter, MLP_GAIN),
        ):
            key = f"{p}{name}.weight"
            w[key] = _normal(seed, key, (out_f, in_f), gain / in_f**0.5)
        w[f"{p}input_layernorm.weight"] = torch.ones(d)
        w[f"{p}post_attention_layernorm.weight"] = torch.ones(d)
    w["model.norm.weight"] = torch.ones(d)
    w["lm_head.weight"] = _normal(
        seed, "lm_head.weight", (shape.vocab_size, d), LM_HEAD_GAIN / d**0.5
    )
    return w


def _normal(seed: int, name: str, shape: tuple[int, int], std: float) -> torch.Tensor:
    """N(0, std^2) from a stream keyed by (seed, tensor name).

    numpy's PCG64 is bit-identical across platforms, unlike thread-count or SIMD dependent
    paths; keying by name makes each tensor independent of the order tensors are built in.
    """
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))
    )
    arr = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return torch.from_numpy(arr)


def _stamp(seed: int, size: str) -> dict[str, object]:
    """What ensure_model compares: the inputs of a build and the code version that ran it."""
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "shape": asdict(SIZES[size]),
        "size": size,
    }


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary directory inside ``out`` whose files are renamed into ``out`` on success.

    The stamp is removed first: from then until the caller rewrites it, the directory does not
    claim to hold a complete model.
    """
    (out / STAMP_NAME).unlink(missing_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        yield stage
        for f in sorted(stage.iterdir()):
            f.chmod(0o644)
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
