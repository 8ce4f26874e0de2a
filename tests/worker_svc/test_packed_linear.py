"""Projections pre-packed for oneDNN give what plain ``F.linear`` gives: exactly in bfloat16 where
oneDNN computes them (the same kernels) and where kernels/cpu_linear.py sums a short row in the same
order, to rounding otherwise (the sum order of a long one) and in float32 (oneDNN's sum order, not
MKL's), and the same greedy tokens in both; the compiled bfloat16 elementwise ops decode as their torch definitions do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from family_models import model_dir, prompts
from torch import nn
from worker_steps import BS, Driver

from kernels import cpu_elementwise
from kernels.row_buckets import bucket_rows, empty_rows, padded
from pagewire.config import WorkerConfig
from pagewire.v1 import common_pb2
from worker_svc import server
from worker_svc.models import packed_linear
from worker_svc.models.packed_linear import (
    WIDEN_FROM_ROWS,
    PackedLinear,
    WidenedLinear,
    can_pack,
    warm,
)
from worker_svc.server import build_runner

BF16 = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16),
                          reason="this CPU's oneDNN has no bfloat16 kernels")
pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32), reason="no oneDNN")
DTYPES = [pytest.param(torch.bfloat16, marks=BF16), torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64, 65, 300, 2049])
def test_a_packed_projection_equals_the_plain_one(rows: int, bias: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(rows)
    plain = nn.Linear(96, 40, bias=bias).to(dtype)
    x = torch.randn(rows, 96, dtype=dtype)
    packed = PackedLinear(plain)
    same = torch.equal if dtype == torch.bfloat16 else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert same(packed(x), plain(x))
    assert same(packed(x.view(1, rows, 96)), plain(x).view(1, rows, 40))
    assert packed(x).dtype == dtype


def record_kernel_products(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The row counts of the products kernels/cpu_linear.py computed (not left to oneDNN)."""
    calls: list[int] = []
    product = packed_linear.cpu_linear.product

    def counted(*args: object) -> torch.Tensor | None:
        out = product(*args)
        if out is not None:
            calls.append(out.shape[0])
        return out

    monkeypatch.setattr(packed_linear.cpu_linear, "product", counted)
    return calls


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 16, 64, 65, 128, 129])
def test_float32_decode_batches_read_the_packed_weight_themselves(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kernels/cpu_linear.py reads oneDNN's buffer for decode batches and short chunks (AVX-512: up
    to 128 rows; AVX2: 1-3, where oneDNN's product is as fast from 4 on); more rows are oneDNN's."""
    plain = nn.Linear(300, 1000, bias=True)
    packed = PackedLinear(plain)
    if packed.blocked is None:
        pytest.skip("oneDNN packs float32 in another layout on this CPU")
    calls = record_kernel_products(monkeypatch)
    x = torch.randn(rows, 300)
    assert torch.allclose(packed(x), plain(x), rtol=1e-5, atol=1e-5)
    assert calls == ([rows] if rows <= packed_linear.cpu_linear.max_rows(torch.float32)
                     else [])


@BF16
@pytest.mark.parametrize("rows", [1, 5, 64, 65, 256, 257, 700])
def test_bfloat16_decode_batches_read_the_packed_weight_themselves(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an AVX-512 BF16 CPU without AMX, kernels/cpu_linear.py computes decode batches and short
    chunks (up to 256 rows); longer chunks are oneDNN's. The sums are float32's, rounded once, as
    oneDNN's are."""
    plain = nn.Linear(1408, 200, bias=True).to(torch.bfloat16)
    packed = PackedLinear(plain)
    if packed.blocked is None:
        pytest.skip("no bfloat16 kernel, or oneDNN packs bfloat16 in another layout on this CPU")
    calls = record_kernel_products(monkeypatch)
    x = torch.randn(rows, 1408, dtype=torch.bfloat16)
    exact = F.linear(x.double(), plain.weight.double(), plain.bias.double())
    assert torch.allclose(packed(x).double(), exact, rtol=2.0**-7, atol=1e-2)
    assert torch.allclose(packed(x.view(1, rows, 1408)).double(), exact.view(1, rows, 200),
                          rtol=2.0**-7, atol=1e-2)
    taken = rows <= packed_linear.cpu_linear.max_rows(torch.bfloat16)
    assert calls == ([rows, rows] if taken else [])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 8, 64, 300])
def test_a_widened_projection_is_the_float32_product_rounded_once(rows: int, bias: bool) -> None:
    """Few rows: the bfloat16 product itself. More: the exact product to within one bfloat16
    step, and nearly always its nearest bfloat16 (one rounding, of a float32 sum)."""
    torch.manual_seed(rows)
    plain = nn.Linear(96, 40, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    out = WidenedLinear(plain)(x.view(1, rows, 96)).view(rows, 40)
    assert out.dtype == torch.bfloat16
    if rows < WIDEN_FROM_ROWS:
        assert torch.equal(out, plain(x))
        return
    bias64 = None if plain.bias is None else plain.bias.double()
    exact = F.linear(x.double(), plain.weight.double(), bias64)
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    assert (out == exact.to(torch.bfloat16)).float().mean() > 0.98


def test_a_widened_bfloat16_model_decodes_the_plain_ones_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU without bfloat16 kernels (forced here on any CPU) the worker widens its
    projections; greedy tokens as the plain bfloat16 model's, logprobs within bfloat16's own
    noise: no further from the plain bfloat16 model's than those are from the float32 model's.
    (A fixed bound does not hold: one activation rounded to its neighbouring bfloat16 moves a
    logprob of order 1 by 0.015 with one prefill attention kernel and 0.057 with another, while
    the plain model's own distance from float32 is 0.11.)"""
    path = model_dir("qwen2")  # q/k/v biases
    plain_tokens, plain_logprobs = greedy(path, packed=False)
    _, float_logprobs = greedy(path, packed=False, dtype="float32")
    monkeypatch.setattr(packed_linear, "can_pack", lambda device, dtype: False)
    monkeypatch.setattr(server, "can_pack", lambda device, dtype: False)
    tokens, logprobs = greedy(path, packed=True, kind=WidenedLinear)
    assert tokens == plain_tokens

    def distance(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) for x, y in zip(a, b, strict=True))

    assert distance(logprobs, plain_logprobs) <= distance(plain_logprobs, float_logprobs)


def test_row_counts_fall_in_few_buckets_each_a_little_larger() -> None:
    """A product runs at a bucketed row count (zero rows added), so the oneDNN primitives of a
    few hundred counts serve every step; the padding stays under 1/16 of the rows."""
    counts = range(1, 8193)
    buckets = {m: bucket_rows(m) for m in counts}
    assert all(buckets[m] == m for m in range(1, 65))  # decode batches run as they are
    assert all(m <= b <= m * 17 / 16 for m, b in buckets.items())
    assert len(set(buckets.values())) <= 176
    assert all(bucket_rows(b) == b for b in buckets.values())


@BF16
def test_a_product_over_an_activation_with_room_runs_in_place_and_equals_the_plain_one() -> None:
    """An input allocated by the elementwise ops (kernels.row_buckets.empty_rows) is extended to
    its bucketed rows in place, garbage rows and all; the rows asked for are exact."""
    torch.manual_seed(0)
    plain = nn.Linear(96, 40).to(torch.bfloat16)
    x = empty_rows(300, 96, dtype=torch.bfloat16)
    x.copy_(torch.randn(300, 96).to(torch.bfloat16))
    assert padded(x, bucket_rows(300)).data_ptr() == x.data_ptr()
    assert torch.equal(PackedLinear(plain)(x), plain(x))


def greedy(path: Path, packed: bool, dtype: str = "bfloat16", kind: type[nn.Module] = PackedLinear
           ) -> tuple[dict[int, list[int]], list[float]]:
    cfg = WorkerConfig(model=str(path), dtype=dtype, num_blocks=256, block_size=BS,
                       packed_weights=packed)
    runner = build_runner(cfg)[0]
    kinds = {type(m) for m in runner.model.modules()}
    assert (kind in kinds) == packed
    driver = Driver(runner)
    for sid, prompt in prompts(runner.model.cfg.vocab_size).items():
        driver.add(sid, prompt, common_pb2.SamplingParams(temperature=0.0, logprobs=1))
    out = driver.run(8, chunk=8)
    return out, [lp.logprob for t in driver.tracks.values() for lp in t.logprobs]


@BF16
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "mixtral"])
def test_a_packed_model_decodes_exactly_as_the_plain_one(arch: str) -> None:
    """Qwen2's q/k/v biases, Gemma's tied embedding (its lm_head stays plain), Mixtral's router."""
    path = model_dir(arch)
    assert greedy(path, packed=True) == greedy(path, packed=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "mixtral"])
def test_a_packed_float32_model_decodes_the_plain_ones_tokens(arch: str) -> None:
    """The same greedy tokens; logprobs equal to float32 rounding."""
    path = model_dir(arch)
    tokens, logprobs = greedy(path, packed=True, dtype="float32")
    plain_tokens, plain_logprobs = greedy(path, packed=False, dtype="float32")
    assert tokens == plain_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, plain_logprobs, strict=True)) < 1e-4


@BF16
@pytest.mark.skipif(cpu_elementwise.load() is None, reason="no C compiler")
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_the_compiled_elementwise_ops_decode_as_the_torch_definitions(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bfloat16 RMSNorm (Gemma's too), RoPE and SiLU-and-multiply in one C pass each: the same
    greedy tokens as the op-by-op torch path, and logprobs within bfloat16 noise."""
    path = model_dir(arch)
    tokens, logprobs = greedy(path, packed=True)
    monkeypatch.setattr(cpu_elementwise, "takes", lambda x: False)
    plain_tokens, plain_logprobs = greedy(path, packed=True)
    assert tokens == plain_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, plain_logprobs, strict=True)) < 2**-5


def _odd_shaped_model() -> nn.Module:
    """Projections of shapes no other test runs, so oneDNN's process-wide cache of built
    products holds none of them before the test."""
    torch.manual_seed(1)
    dims = [(104, 72, True), (72, 104, False), (104, 40, False), (40, 104, True)]
    return nn.Sequential(*(PackedLinear(nn.Linear(i, o, bias=b).to(torch.bfloat16))
                           for i, o, b in dims))


def _built(model: nn.Module, rows: list[int], capfd: pytest.CaptureFixture[str]) -> list[str]:
    """oneDNN's own account (its verbose log) of the products it had to build to run ``model``
    at each of ``rows``."""
    capfd.readouterr()
    with torch.inference_mode(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
        for n in rows:
            model(empty_rows(n, 104, dtype=torch.bfloat16).zero_())
    out = capfd.readouterr().out
    return [ln for ln in out.splitlines() if "inner_product" in ln and "cache_miss" in ln]


@BF16
def test_the_warm_up_builds_every_product_a_step_of_up_to_the_budget_runs(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """After the warm-up no step of up to ``max_rows`` tokens builds a product (decode batches,
    prefill sizes, the budget itself), though 4 shapes x 144 row counts are more products than
    oneDNN's default cache holds (packed_linear raises it); a larger step still builds one per
    projection, so the check can see one."""
    model = _odd_shaped_model()
    done = warm(model, max_rows=2048, budget_s=300.0)
    assert done == sorted({bucket_rows(n) for n in range(1, 2049)})
    assert done[:64] == list(range(1, 65))  # decode batches first
    assert _built(model, [1, 17, 64, 65, 97, 130, 1000, 2048], capfd) == []
    assert len(_built(model, [2100], capfd)) == 4


@BF16
def test_no_product_is_built_where_a_c_kernel_computes_the_rows(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Row counts kernels/cpu_linear.py computes need no oneDNN product: neither the warm-up nor a
    step of them builds one (no start-up time, no memory: on a Zen 4 in bfloat16, 128 of the 144
    row counts of a 2,048-token budget)."""
    torch.manual_seed(2)
    model = nn.Sequential(PackedLinear(nn.Linear(112, 56).to(torch.bfloat16)),
                          PackedLinear(nn.Linear(56, 112, bias=False).to(torch.bfloat16)))
    if any(m.blocked is None for m in model):
        pytest.skip("no bfloat16 kernel, or oneDNN packs bfloat16 in another layout on this CPU")
    top = packed_linear.cpu_linear.max_rows(torch.bfloat16)
    capfd.readouterr()
    with torch.inference_mode(), torch.backends.mkldnn.verbose(
            torch.backends.mkldnn.VERBOSE_ON_CREATION):
        done = warm(model, max_rows=top, budget_s=300.0)
        for rows in (1, 64, top):
            model(torch.randn(rows, 112, dtype=torch.bfloat16))
    built = [ln for ln in capfd.readouterr().out.splitlines() if "inner_product" in ln]
    assert done == sorted({bucket_rows(n) for n in range(1, top + 1)}) and built == []


@BF16
def test_the_warm_up_stops_at_its_budget_and_skips_unpacked_models() -> None:
    assert warm(_odd_shaped_model(), max_rows=200, budget_s=0.0) == []
    assert warm(nn.Sequential(nn.Linear(8, 8)), max_rows=200, budget_s=60.0) == []


def test_the_warm_up_runs_a_float32_model_in_float32() -> None:
    model = nn.Sequential(PackedLinear(nn.Linear(24, 8)))
    assert warm(model, max_rows=70, budget_s=60.0) == list(range(1, 65)) + [68, 72]
