"""CUDA checks, skipped where torch sees no GPU (CI has none; run them on a lent GPU: benchmarks/run_gpu.sh).

Every method on CUDA gives the CPU's logits and token counts; bfloat16 runs with the same counts; DynamicViT's
`policy_attention` gives autograd's values and gradients on CUDA; a bf16-autocast training step of each method
runs; `torch.compile` (inductor, fullgraph) matches eager per method; `dynavit bench --device cuda` writes its
report.
"""
from __future__ import annotations

import pytest
import torch

import dynavit
from conftest import FIXED_COUNT_METHODS, TINY64_CFG as CFG
from dynavit.bench import BenchConfig, run_benchmark
from dynavit.timing import logits_of
from dynavit.methods.dynamicvit import policy_attention
from test_dynamicvit import explicit_policy_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in these comparisons (cuDNN convolutions use it by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return dynavit.create_model("vit", **FIXED_COUNT_METHODS[name], **CFG).eval()


@pytest.mark.parametrize("name", list(FIXED_COUNT_METHODS))
def test_cuda_matches_cpu(name):
    """In float64, so that no near-tie of an untrained model's scores can flip a kept set or a match."""
    model, x = tiny(name).double(), torch.randn(4, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref, ref_info = model(x, return_info=True)
        out, info = model.to(CUDA)(x.to(CUDA), return_info=True)
    assert (out.cpu() - ref).abs().max().item() <= 1e-9
    assert info.token_counts == ref_info.token_counts


@pytest.mark.parametrize("name", list(FIXED_COUNT_METHODS))
def test_bfloat16_runs_with_the_same_token_counts(name):
    model, x = tiny(name).to(CUDA), torch.randn(4, 3, 64, 64, device=CUDA)
    with torch.no_grad():
        _, ref_info = model(x, return_info=True)
        out, info = model.to(torch.bfloat16)(x.bfloat16(), return_info=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert info.token_counts == ref_info.token_counts  # (values: an untrained tiny model's logits are near ties)


def test_policy_attention_matches_autograd_on_cuda():
    torch.manual_seed(0)
    B, H, T, d = 2, 3, 17, 8
    q, k, v = (torch.randn(B, H, T, d, device=CUDA, dtype=torch.float64, requires_grad=True) for _ in range(3))
    policy = torch.cat([torch.ones(B, 1), (torch.rand(B, T - 1) < 0.6).double()], 1).to(CUDA).requires_grad_()
    grad = torch.randn(B, H, T, d, device=CUDA, dtype=torch.float64)
    out = policy_attention(q, k, v, policy, d ** -0.5)
    got = torch.autograd.grad(out, (q, k, v, policy), grad)
    ref = explicit_policy_attention(q, k, v, policy, d ** -0.5)
    want = torch.autograd.grad(ref, (q, k, v, policy), grad)
    assert (out - ref).abs().max().item() <= 1e-12
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= 1e-10


@pytest.mark.parametrize("name", list(FIXED_COUNT_METHODS))
def test_bf16_autocast_training_step(name):
    model, x = tiny(name).to(CUDA).train(), torch.randn(4, 3, 64, 64, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = logits_of(model(x), 4)
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.arange(4, device=CUDA))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FIXED_COUNT_METHODS))
def test_inductor_compile_matches_eager(name):
    torch._dynamo.reset()
    # float64: the compiled kernels sum in other orders, which must not flip an untrained model's near ties
    model, x = tiny(name).to(CUDA).double(), torch.randn(4, 3, 64, 64, device=CUDA, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert (out - ref).abs().max().item() <= 1e-9


def test_bench_on_cuda_reports_every_field():
    cfg = BenchConfig(model="vit", specs=["dense", "dynamicvit:0.7", "evit:0.7", "bat:0.7", "tome:1"],
                      batch_size=8, device="cuda", dtype="bfloat16", repeats=2, warmup=1, b1_repeats=2,
                      model_kwargs={k: v for k, v in CFG.items() if k != "img_size"}, img_size=64)
    report = run_benchmark(cfg)
    assert report["machine"]["device"] == "cuda" and report["machine"]["dtype"] == "bfloat16"
    for row in report["results"]:
        for key in ("gmacs", "img_per_s", "latency_ms_b1", "peak_mem_mb", "speedup", "ideal_speedup", "efficiency"):
            assert row[key] is not None and row[key] > 0, (row["method"], key)
