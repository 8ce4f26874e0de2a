"""A test model whose greedy output is a script: chosen text, token for token, from a real model.

The random test model cannot be asked for a tool call. This one is built so that it must make
one: a one-layer Llama whose attention and MLP write nothing (o_proj and down_proj are zero), so
the last hidden state is the current token's embedding alone, and whose lm_head row for token s
is the embedding of the token that must precede s. Greedy decoding then walks a chain of added
tokens, one script piece each, from the last token of the chat template's generation prompt to
EOS. Embeddings are random in 128 dimensions, so the chosen logit (|e|^2) beats every other
(e.e', ~N(0, 1) before scaling) by a wide margin: the output is the script whatever the prompt,
and transformers' own greedy generation on the same files gives the same ids.

The pieces split the script at awkward places (inside a tag, a key, a string) so the router's
parsers meet them as a real tokenizer would deal them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tool_chat import HERMES_TEMPLATE
from transformers import AutoTokenizer

# What the model says: a think block, a sentence, two tool calls (Hermes format), then EOS.
SCRIPT = (
    "<think>", "The user wants", " the weather.", "</think>", "\n\nLet me ", "check.",
    "\n<tool_call>", '\n{"name": "get_', 'weather", "arguments": {"city": "Par',
    'is", "unit": "celsius"}}\n</tool', "_call>",
    '\n<tool_call>\n{"name": "get_time", "arguments": {}}', "\n</tool_call>",
)
SCALE = 0.25  # logits = SCALE * e.e' with |e|^2 ~ 128: a winning margin of ~25


def build(
    base: Path, out: Path, script: tuple[str, ...] = SCRIPT, seed: int = 0,
    special: tuple[str, ...] = (),
) -> Path:
    """Write the scripted model into ``out`` from the test model at ``base`` (its tokenizer,
    with the script's pieces added, and its config, with one layer). Pieces in ``special`` are
    special tokens (as Mistral's ``[TOOL_CALLS]`` is): skipped when decoding skips them."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens([p for p in script if p not in special])
    tokenizer.add_tokens(list(special), special_tokens=True)
    tokenizer.chat_template = HERMES_TEMPLATE
    tokenizer.save_pretrained(out)
    config = json.loads((base / "config.json").read_text())
    config.update(vocab_size=len(tokenizer), num_hidden_layers=1)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(base / "generation_config.json", out / "generation_config.json")
    start = _generation_prompt_end(tokenizer)
    chain = [start, *tokenizer.convert_tokens_to_ids(list(script)), tokenizer.eos_token_id]
    save_file(_weights(config, chain, seed), str(out / "model.safetensors"), {"format": "pt"})
    return out


def _generation_prompt_end(tokenizer: object) -> int:
    """The last token of any chat prompt: the end of the template's generation prompt."""
    ids = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return int(ids[-1])


def _weights(config: dict, chain: list[int], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab, d = config["vocab_size"], config["hidden_size"]
    heads, kv, head_dim = (config["num_attention_heads"], config["num_key_value_heads"],
                           config["head_dim"])
    inter = config["intermediate_size"]
    embed = torch.randn(vocab, d, generator=g)
    lm_head = torch.zeros(vocab, d)
    for prev, nxt in zip(chain, chain[1:], strict=False):
        lm_head[nxt] += SCALE * embed[prev]
    layer = "model.layers.0."
    return {
        "model.embed_tokens.weight": embed,
        "model.norm.weight": torch.ones(d),
        "lm_head.weight": lm_head,
        layer + "input_layernorm.weight": torch.ones(d),
        layer + "post_attention_layernorm.weight": torch.ones(d),
        layer + "self_attn.q_proj.weight": torch.randn(heads * head_dim, d, generator=g) / d**0.5,
        layer + "self_attn.k_proj.weight": torch.randn(kv * head_dim, d, generator=g) / d**0.5,
        layer + "self_attn.v_proj.weight": torch.randn(kv * head_dim, d, generator=g) / d**0.5,
        layer + "self_attn.o_proj.weight": torch.zeros(d, heads * head_dim),
        layer + "mlp.gate_proj.weight": torch.randn(inter, d, generator=g) / d**0.5,
        layer + "mlp.up_proj.weight": torch.randn(inter, d, generator=g) / d**0.5,
        layer + "mlp.down_proj.weight": torch.zeros(d, inter),
    }
