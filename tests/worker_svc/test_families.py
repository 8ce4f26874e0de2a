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
    "qwen3-yarn": ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 1024,
                                                  "rope_theta": 10000.0}}),
    "llama-llama3-rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 10000.0}}),
    "llama-gelu": ("llama", {"hidden_act": "gelu"}),
    # served up to original_max_position_embeddings, where transformers uses the short factors
    "phi3-longrope": ("phi3", {"max_position_embeddings": 16384, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
        "short_factor": [1.0 + 0.1 * i for i in range(16)],
        "long_factor": [2.0 + i for i in range(16)]}}),
    "mixtral": ("mixtral", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-unnormalised": ("qwen3_moe", {"norm_topk_prob": False}),
    "qwen3_moe-dense-layers": ("qwen3_moe", {"mlp_only_layers": [0], "decoder_sparse_step": 1}),
    "qwen3_moe-sparse-step": ("qwen3_moe", {"decoder_sparse_step": 2}),
}


# The windowed and soft-capped cases again on the other backends (Triton under the interpreter).
OTHER_BACKENDS = ["mistral-window", "gemma2", "gemma3", "phi3-partial-rope-window",
                  "qwen3_moe"]


@pytest.mark.parametrize("case", list(CASES))
def test_family_greedy_tokens_match_transformers(case: str) -> None:
    check_case(case, "cpu")


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("case", OTHER_BACKENDS)
def test_windows_and_softcaps_match_on_every_backend(case: str, backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    check_case(case, backend)


def check_case(case: str, backend: str) -> None:
    arch, overrides = CASES[case]
    path = model_dir(arch, **overrides)
    hf = hf_model(path)
    ps = prompts(hf.config.vocab_size)
    expected = {sid: hf_generate(hf, p, N_OUT) for sid, p in ps.items()}
    driver = Driver(runner_for(path, backend, max_model_len=4096 if "longrope" in case else 0))
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
