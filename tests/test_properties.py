"""Property tests (hypothesis) for every method on a tiny ViT: shapes, token counts, identity at no reduction,
finite outputs on extreme inputs, merging methods keep every patch, batch independence."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import dynavit

from conftest import MERGING, RANDOM, TINY64_CFG as CFG, reducing, vit_methods

N = 16  # (64 / 16) ** 2 patches


def _reducing(name):
    def kwargs(keep):
        kw = {k: v for k, v in reducing(name, keep=keep, r=1).items() if k != "method"}
        return {**kw, "seed": 0} if name in RANDOM else kw
    return kwargs


# name -> (method, reducing kwargs builder, no-reduction kwargs, merges): every registered method
METHODS = {n: (n, _reducing(n), spec.identity, n in MERGING) for n, spec in vit_methods().items()}
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
_CACHE: dict = {}


def build(name: str, kwargs: dict):
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = dynavit.create_model("vit", method=METHODS[name][0], **kwargs, **CFG).eval()
    return _CACHE[key]


def run(model, x):
    with torch.no_grad():
        return model(x, return_info=True)


@pytest.mark.parametrize("name", list(METHODS))
@SETTINGS
@given(batch=st.integers(1, 8), keep=st.sampled_from([0.5, 0.7, 0.9]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_shapes_and_token_counts(name, batch, keep, dtype):
    model = build(name, METHODS[name][1](keep)).to(dtype)
    try:
        out, info = run(model, torch.randn(batch, 3, 64, 64, dtype=dtype))
    finally:
        model.float()
    assert out.shape == (batch, 10) and out.dtype == dtype and bool(torch.isfinite(out).all())
    counts = [N] + list(info.token_counts)
    assert len(counts) > 1 and all(a >= b for a, b in zip(counts, counts[1:])) and counts[-1] <= N
    for count, p2t in zip(info.token_counts, info.patch_to_token):
        assert p2t.shape == (batch, N) and int(p2t.max()) < count and int(p2t.min()) >= -1
        if METHODS[name][3]:  # merging: no patch is lost and sizes partition the N patches
            assert int(p2t.min()) >= 0
    if METHODS[name][3]:
        for sizes in info.sizes:
            torch.testing.assert_close(sizes.float().sum(-1), torch.full((batch,), float(N)))


@pytest.mark.parametrize("name", list(METHODS))
def test_no_reduction_equals_dense(name):
    torch.manual_seed(0)
    dense = dynavit.create_model("vit", **CFG).eval()
    model = build(name, METHODS[name][2])
    report = model.load_state_dict(dense.state_dict(), strict=False)
    assert report.unexpected_keys == [] and all(k.split(".")[0] in model.method_modules for k in report.missing_keys)
    x = torch.randn(3, 3, 64, 64)
    out, info = run(model, x)
    with torch.no_grad():
        assert (out - dense(x)).abs().max().item() <= 1e-5
    assert all(c == N for c in info.token_counts)


@pytest.mark.parametrize("name", list(METHODS))
@SETTINGS
@given(value=st.sampled_from([0.0, 1.0, -1e4, 1e4, 1e6]), keep=st.sampled_from([0.5, 0.7]))
def test_extreme_inputs_stay_finite(name, value, keep):
    model = build(name, METHODS[name][1](keep))
    const = torch.full((2, 3, 64, 64), value)  # all-equal tokens
    huge = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * value
    for x in (const, huge):
        out, info = run(model, x)
        assert bool(torch.isfinite(out).all()), f"{name} gives non-finite logits for input scale {value}"
        if METHODS[name][3]:
            assert all(int(p.min()) >= 0 for p in info.patch_to_token)


@pytest.mark.parametrize("name", [n for n in METHODS if n not in RANDOM])  # random draws per batch by design
@SETTINGS
@given(batch=st.integers(2, 8), index=st.integers(0, 7), keep=st.sampled_from([0.5, 0.7]))
def test_image_alone_equals_image_in_batch(name, batch, index, keep):
    model = build(name, METHODS[name][1](keep))
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    i = index % batch
    out_batch, _ = run(model, x)
    out_alone, _ = run(model, x[i:i + 1])
    assert (out_batch[i] - out_alone[0]).abs().max().item() <= 1e-4
