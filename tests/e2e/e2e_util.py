"""Helpers for the end-to-end tests: launching real stacks, the transformers oracle."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagewire.launcher import Stack, start_stack
from pagewire.redis_keys import RedisKeys


def launch(model: Path, log_dir: Path, **kwargs: object) -> Stack:
    return asyncio.run(start_stack(str(model), log_dir=log_dir, **kwargs))  # type: ignore[arg-type]


def redis_keys(model: Path) -> RedisKeys:
    return RedisKeys("default", model.resolve().name)


class HFReference:
    """transformers' own greedy generation on the same model directory: the oracle."""

    def __init__(self, model: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.inference_mode():
            out = self.model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        return out[0, len(prompt_ids) :].tolist()
