"""A CPU decode step's layers in one C call (worker_svc/models/decode_layers.py): the decoders it
takes give the Python layers' hidden states bit for bit, and every other model, backend or step
keeps the Python layers."""

from __future__ import annotations

import pytest
import torch
from family_models import model_dir

from kernels import cpu_linear
from pagewire.config import WorkerConfig
from worker_svc.models import decode_layers
from worker_svc.models.llama import AttentionMetadata
from worker_svc.runner import ModelRunner
from worker_svc.server import build_runner

BS = 4
TAKEN = {
    "llama": ("llama", {}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "qwen2": ("qwen2", {}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
    "phi3-partial-rope": ("phi3", {"partial_rotary_factor": 0.5}),
    "qwen3 (per-head q/k norms)": ("qwen3", {}),
    "qwen3-window": ("qwen3", {"use_sliding_window": True, "sliding_window": 8,
                               "max_window_layers": 1}),
    "gemma": ("gemma", {}),
    "gemma2 (sandwich norms, soft-caps, windows)": ("gemma2", {
        "sliding_window": 8, "attn_logit_softcapping": 3.0, "final_logit_softcapping": 5.0}),
    "gemma3 (two RoPE tables, per-head norms)": ("gemma3", {"sliding_window": 8}),
}
KEPT = {
    "llama-gelu": ("llama", {"hidden_act": "gelu"}),
    "mixtral (experts)": ("mixtral", {}),
}


def _runner(arch: str, overrides: dict, dtype: str, backend: str = "cpu") -> ModelRunner:
    cfg = WorkerConfig(model=str(model_dir(arch, **overrides)), dtype=dtype, num_blocks=1024,
                       block_size=BS, attention_backend=backend)
    return build_runner(cfg)[0]


def _decode_step(runner: ModelRunner, lens: list[int], seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Decodes of len(lens) sequences with these context lengths (this step's token included),
    each over its own blocks; the caches hold random K/V."""
    g = torch.Generator().manual_seed(seed)
    for k, v in runner.kv_caches:
        k.copy_(torch.randn(k.shape, generator=g).to(k.dtype))
        v.copy_(torch.randn(v.shape, generator=g).to(v.dtype))
    width = -(-max(lens) // BS)
    assert len(lens) * width <= runner.kv_caches[0][0].shape[0]
    tables = torch.arange(len(lens) * width, dtype=torch.int32).view(len(lens), width)
    ctx = torch.tensor(lens, dtype=torch.int32)
    last = ctx.long() - 1
    slots = tables.long().gather(1, (last // BS)[:, None])[:, 0] * BS + last % BS
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, context_lens=ctx,
                             cu_seqlens_q=torch.zeros(1, dtype=torch.int32),
                             num_decode=len(lens), backend=runner.backend, every_slot_stored=True)
    ids = torch.randint(0, runner.vocab_size, (len(lens),), generator=g)
    return ids, last, meta


def _both(runner: ModelRunner, lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's final hidden states through the stack, then through the Python layers."""
    model = runner.model
    stack = model.layer_stack
    ids, positions, meta = _decode_step(runner, lens, seed=len(lens))
    try:
        fused = model(ids, positions, runner.kv_caches, meta)
        model.layer_stack = None
        layered = model(ids, positions, runner.kv_caches, meta)
    finally:
        model.layer_stack = stack
    return fused, layered


def _kernels_here(dtype: str) -> None:
    if not cpu_linear.kernels(getattr(torch, dtype)):
        pytest.skip(f"no product kernel for {dtype} on this CPU: decodes run layer by layer")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(TAKEN))
def test_the_stack_gives_the_python_layers_hidden_states_bit_for_bit(case: str, dtype: str) -> None:
    _kernels_here(dtype)
    runner = _runner(*TAKEN[case], dtype)
    assert runner.model.layer_stack is not None
    for lens in ([1], [5], [3, 17, 9, 30, 2], [(7 * i) % 40 + 1 for i in range(64)]):
        fused, layered = _both(runner, lens)
        assert torch.equal(fused, layered), (case, dtype, len(lens))
        assert fused.isfinite().all()


@pytest.mark.parametrize("case", list(KEPT))
def test_other_layers_keep_the_python_layers(case: str) -> None:
    _kernels_here("float32")
    assert _runner(*KEPT[case], "float32").model.layer_stack is None


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_chosen_attention_backend_keeps_the_python_layers(backend: str) -> None:
    _kernels_here("float32")
    assert _runner("llama", {}, "float32", backend).model.layer_stack is None


def test_steps_the_stack_does_not_take_run_layer_by_layer() -> None:
    """A batch past the product kernels' rows, a step whose slots hold a -1 (not stored), and
    caches other than those the stack was laid out over."""
    _kernels_here("float32")
    runner = _runner("llama", {}, "float32")
    stack = runner.model.layer_stack
    k_cache = runner.kv_caches[0][0]
    assert stack is not None and not stack.takes(cpu_linear.max_rows(torch.float32) + 1, k_cache)
    assert stack.takes(3, k_cache) and not stack.takes(3, k_cache.clone())
    calls = []
    stack.run = lambda *a: calls.append(a)  # type: ignore[method-assign]
    try:
        rows = cpu_linear.max_rows(torch.float32) + 1
        ids, positions, meta = _decode_step(runner, [3] * rows, seed=0)
        runner.model(ids, positions, runner.kv_caches, meta)
        ids, positions, meta = _decode_step(runner, [3, 4], seed=0)
        meta.every_slot_stored = False
        runner.model(ids, positions, runner.kv_caches, meta)
        ids, positions, meta = _decode_step(runner, [3, 4], seed=0)
        runner.model(ids, positions, [(k.clone(), v.clone()) for k, v in runner.kv_caches], meta)
    finally:
        del stack.run
    assert not calls


def test_switched_off_by_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    _kernels_here("float32")
    runner = _runner("llama", {}, "float32")
    monkeypatch.setenv("PAGEWIRE_CPU_DECODE_LAYERS", "0")
    from kernels import cpu_decode_layers
    cpu_decode_layers.load.cache_clear()
    try:
        assert decode_layers.build(runner.model, runner.kv_caches, runner.backend) is None
    finally:
        cpu_decode_layers.load.cache_clear()
