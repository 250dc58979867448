"""Bad configurations and inputs raise a dynavit error (a ValueError subclass naming the value), never a bare
torch shape error."""
from __future__ import annotations

import pytest
import torch

import dynavit
from dynavit.errors import DynavitError
from dynavit.registry import list_methods

from conftest import vit_methods

CFG = dict(img_size=64, patch_size=16, embed_dim=48, depth=12, num_heads=3, num_classes=10)


def make(**kw):
    return dynavit.create_model("vit", **kw, **CFG).eval()


@pytest.mark.parametrize("method", [n for n, s in vit_methods().items() if s.primary == "keep_rate"])
@pytest.mark.parametrize("keep_rate", [0.0, -0.5, 1.5, float("nan")])
def test_keep_rate_outside_unit_interval(method, keep_rate):
    with pytest.raises(DynavitError, match=r"keep_rate.*got") as e:
        make(method=method, keep_rate=keep_rate)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("r, match", [(9, "ToMe r=9 in block 0 exceeds the 8 tokens"),
                                      (100, "ToMe r=100 in block 0 exceeds"), (-1, "r must be >= 0"),
                                      (1.5, "r must be an int.*got 1.5")])
def test_tome_r_too_large_or_negative(r, match):
    with pytest.raises(DynavitError, match=match):
        make(method="tome", r=r)


@pytest.mark.parametrize("method", list(list_methods()))
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
    with pytest.raises(DynavitError, match="patch_size=6"):
        dynavit.create_model("demo_vit", patch_size=6)  # the demo stem's three convolutions need 4k pixels
    with pytest.raises(DynavitError, match="'mean'"):
        dynavit.create_model("pvt_v2_b0", global_pool="mean")
