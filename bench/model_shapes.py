"""Model directories of real models' shapes, for benchmarks with ``--load-format dummy``.

A shape directory holds a ``config.json`` with the published architecture of a model (no
weights: the worker fills them with random values) and the test model's tokenizer files, so the
router can start on it. Prompts of the benchmarks are random token ids below the shape's vocab
size; ids past the tokenizer's own vocabulary detokenize to nothing, which costs the router the
same work.

    python bench/model_shapes.py llama-3.1-8b /tmp/llama8b
    python bench/model_shapes.py qwen2.5-0.5b /tmp/qwen05 --override num_hidden_layers=2
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    },
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "gemma-3-1b": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
        "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 2,
        "eos_token_id": 1,
    },
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def parse_override(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = json.loads(value)
    return out


def write_shape(name: str, out: str | Path, override: dict[str, Any] | None = None) -> Path:
    """``out`` holding the named shape's config (with ``override``) and a tokenizer."""
    from pagewire.testmodel import ensure_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {**SHAPES[name], **(override or {})}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    source = ensure_model(Path.home() / ".cache/pagewire/models/tiny-seed0", seed=0, size="tiny")
    for f in TOKENIZER_FILES:
        shutil.copy(source / f, out / f)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out")
    p.add_argument("--override", action="append", default=[], help="key=json-value")
    args = p.parse_args()
    print(write_shape(args.shape, args.out, parse_override(args.override)))


if __name__ == "__main__":
    main()
