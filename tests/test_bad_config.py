"""Bad configurations and inputs raise a dynavit error (a ValueError subclass naming the value), never a bare
torch shape error."""
from __future__ import annotations

import pytest
import torch

import dynavit
from dynavit.errors import DynavitError

torch.set_num_threads(1)
CFG = dict(img_size=64, patch_size=16, embed_dim=48, depth=12, num_heads=3, num_classes=10)


def make(**kw):
    return dynavit.create_model("vit", **kw, **CFG).eval()


@pytest.mark.parametrize("method", ["dynamicvit", "evit", "bat", "topk", "random"])
@pytest.mark.parametrize("keep_rate", [0.0, -0.5, 1.5, float("nan")])
def test_keep_rate_outside_unit_interval(method, keep_rate):
    with pytest.raises(DynavitError) as e:
        make(method=method, keep_rate=keep_rate)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("r", [9, 100, -1])
def test_tome_r_too_large_or_negative(r):
    with pytest.raises(DynavitError, match="r"):
        make(method="tome", r=r)


@pytest.mark.parametrize("method", ["dynamicvit", "evit", "bat", "tome"])
def test_method_on_unsupported_model(method):
    with pytest.raises(DynavitError, match=method):
        dynavit.create_model("dit_tiny", method=method)


@pytest.mark.parametrize("shape,dtype", [((1, 3, 32, 32), torch.float32), ((1, 1, 64, 64), torch.float32),
                                         ((1, 3, 64, 64), torch.uint8), ((3, 64, 64), torch.float32)])
@pytest.mark.parametrize("method", [None, "evit", "tome"])
def test_bad_input_tensor(shape, dtype, method):
    model = make(method=method, **({"r": 1} if method == "tome" else {}))
    x = torch.zeros(shape, dtype=dtype)
    with pytest.raises(DynavitError) as e, torch.no_grad():
        model(x)
    assert isinstance(e.value, ValueError)


def test_conv_stem_patch_size_and_pvt_pool_are_checked():
    with pytest.raises(DynavitError, match="patch_size=6"):  # the stem makes k x 4-pixel patches (8 is valid)
        dynavit.create_model("demo_vit", patch_size=6)
    with pytest.raises(DynavitError, match="'mean'"):
        dynavit.create_model("pvt_v2_b0", global_pool="mean")
