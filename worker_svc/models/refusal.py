"""What pagewire refuses to serve, and the one error that says so.

A model served slightly wrong looks like a model working: nothing crashes, the text is merely
worse. So every key of ``config.json`` is accounted for: either the family's config reader uses
it (and checks its value), or it is listed here as inert for inference (dropouts, initialisation,
token ids, bookkeeping), or the worker refuses to start, naming the key. A key that transformers
adds tomorrow is refused until someone decides which of the two it is.
"""

from __future__ import annotations

from typing import Any


class Unsupported(ValueError):
    """A model, config key or value pagewire cannot serve exactly; the message names it."""

    def __init__(self, key: str, value: Any, why: str) -> None:
        self.key = key
        super().__init__(f"config.json: {key}={value!r} is not supported: {why}")


# Keys that do not change what a forward pass computes at inference.
INERT = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "attention_dropout", "embd_pdrop", "resid_pdrop", "hidden_dropout", "dropout",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",  # training only
    "pretraining_tp",  # transformers computes the same product either way
    "cache_implementation", "_attn_implementation", "use_bidirectional_attention",
    "max_position_embeddings",  # read by the worker, not the model
    "tokenizer_class", "chat_template", "task_specific_params", "is_decoder",
    # Repository code for the same architecture (official Phi-3 configs carry it): transformers
    # runs its own implementation unless told to trust remote code, and so does pagewire; an
    # architecture pagewire does not implement is refused by name before this matters.
    "auto_map",
    "sliding_window_size",  # Gemma 2's legacy duplicate; transformers reads sliding_window
})


def check_keys(hf: dict[str, Any], handled: frozenset[str]) -> None:
    """Refuse the first key neither the family reads nor INERT lists, and the known dangers."""
    if hf.get("quantization_config") is not None:
        method = (hf["quantization_config"] or {}).get("quant_method", "?")
        raise Unsupported("quantization_config", method,
                          "quantized checkpoints are not implemented (serve unquantized weights)")
    if hf.get("use_bidirectional_attention"):
        raise Unsupported("use_bidirectional_attention", True, "only causal decoding is served")
    for key, value in hf.items():
        if key not in handled and key not in INERT:
            raise Unsupported(key, value, "pagewire does not implement this key for "
                              f"{hf.get('model_type')!r} models, and it may change the math")


def require(key: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``allowed``, else refuse naming ``key``."""
    if value not in allowed:
        raise Unsupported(key, value, f"supported values: {', '.join(map(repr, allowed))}")
    return value
