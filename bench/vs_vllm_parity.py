"""Before timing anything: do both servers produce the same greedy tokens on the same prompts?

Prompts go in as token ids (no tokenizer in between); pagewire's token ids come from its gRPC
API, vLLM's from its completions endpoint with ``return_token_ids``, so the comparison is exact.
In float32 the two must agree token for token (both compute the same model); in bfloat16
rounding differs between implementations and a greedy path may part after a near-tie, so there
the bench only reports how far they agree.
"""

from __future__ import annotations

import asyncio

import numpy as np
from vs_vllm_servers import RunningServer, http_json

from pagewire import serving
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

PROMPT_LENS = (7, 33, 128, 300)
MAX_TOKENS = 32


def parity_prompts(vocab_size: int, seed: int = 1234) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(5, vocab_size, size=n).tolist() for n in PROMPT_LENS]


async def pagewire_tokens(addr: str, prompt: list[int]) -> list[int]:
    req = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
    )
    out: list[int] = []
    async with serving.insecure_channel(addr) as channel:
        async for resp in generation_pb2_grpc.GenerationStub(channel).Generate(req):
            out.extend(resp.token_ids)
    return out


def vllm_tokens(server: RunningServer, model: str, prompt: list[int]) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    return list(http_json(server.base_url + "/v1/completions", body)["choices"][0]["token_ids"])


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def check(pagewire: RunningServer, vllm: RunningServer, model: str, vocab_size: int) -> dict:
    """Greedy tokens of both servers on each prompt; ``identical`` when all match exactly."""
    rows = []
    for prompt in parity_prompts(vocab_size):
        pw = asyncio.run(pagewire_tokens(pagewire.grpc_addr, prompt))
        vl = vllm_tokens(vllm, model, prompt)
        rows.append({"prompt_len": len(prompt), "pagewire": pw, "vllm": vl,
                     "same_prefix": common_prefix(pw, vl), "identical": pw == vl})
    return {"identical": all(r["identical"] for r in rows), "max_tokens": MAX_TOKENS, "rows": rows}


def describe(result: dict, dtype: str) -> str:
    agree = ", ".join(f"{r['same_prefix']}/{MAX_TOKENS}" for r in result["rows"])
    verdict = "identical" if result["identical"] else "NOT identical"
    return (f"greedy parity ({dtype}, {len(result['rows'])} prompts of "
            f"{'/'.join(str(n) for n in PROMPT_LENS)} tokens): {verdict}; "
            f"tokens agreeing before the first difference: {agree}")
