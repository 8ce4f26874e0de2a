"""Every served family against transformers' generate on the same random-weight directory.

Each case runs the worker's runner as the scheduler drives it (chunked prefill across block and
window edges, packed decodes) and must produce exactly transformers' greedy tokens in float32,
and the longest prompt's logprobs within 1e-4 of transformers' at every position (a finer
check than argmaxes: a window ignored or a cap left out moves them long before it flips one).
"""

from __future__ import annotations

import pytest
import torch
from family_models import hf_generate, hf_model, model_dir, prompts, runner_for
from worker_steps import Driver, hf_logits

from pagewire.v1 import common_pb2

GREEDY = common_pb2.SamplingParams(temperature=0.0)
N_OUT = 6

CASES = {
    "llama": ("llama", {}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3-window": ("qwen3", {"use_sliding_window": True, "sliding_window": 8,
                               "max_window_layers": 1}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {"sliding_window": 8, "attn_logit_softcapping": 3.0,
                          "final_logit_softcapping": 5.0}),
    "gemma3": ("gemma3", {"sliding_window": 8}),  # local, global: their own rope bases
    "gemma3-all-local": ("gemma3", {"sliding_window": 8, "sliding_window_pattern": 6}),
    "phi3": ("phi3", {}),
    "phi3-partial-rope-window": ("phi3", {"partial_rotary_factor": 0.5, "sliding_window": 8}),
    "mixtral": ("mixtral", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-unnormalised": ("qwen3_moe", {"norm_topk_prob": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_family_greedy_tokens_match_transformers(case: str) -> None:
    arch, overrides = CASES[case]
    path = model_dir(arch, **overrides)
    hf = hf_model(path)
    ps = prompts(hf.config.vocab_size)
    expected = {sid: hf_generate(hf, p, N_OUT) for sid, p in ps.items()}
    driver = Driver(runner_for(path))
    longest = max(ps, key=lambda sid: len(ps[sid]))
    for sid, p in ps.items():
        params = common_pb2.SamplingParams(temperature=0.0, prompt_logprobs=0 if sid == longest
                                           else None)
        driver.add(sid, p, params)
    assert driver.run(N_OUT, chunk=5) == expected
    prompt = ps[longest]
    ref = hf_logits(hf, prompt).log_softmax(-1)
    got = [lp for c in driver.tracks[longest].prompt_logprobs for lp in c.positions]
    assert len(got) == len(prompt) - 1
    want = torch.tensor([float(ref[i, prompt[i + 1]]) for i in range(len(prompt) - 1)])
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in got]), want, atol=1e-4, rtol=0)
