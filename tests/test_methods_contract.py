"""Contract of every registered method (and a few variants): shapes, dtypes, batch sizes, resolutions, identity
at the parameters that reduce nothing, token counts, the patch map (a partition for merging methods, -1 only for
pruning), the attention extras each method declares, and a clean `apply_method` twice."""
from __future__ import annotations

import pytest
import torch

import dynavit

from dynavit.reduction import TokenReducer
from dynavit.registry import list_methods
from dynavit.timing import logits_of
from dynavit.tokens import merge_tokens, select_tokens

from conftest import DEIT_CFG, MERGING, PRUNING, RANDOM, reducing, vit_methods

# name -> (method, kwargs at a real reduction, kwargs that reduce nothing, merges (no patch is lost)):
# every registered method, then variants of them
METHODS = {
    **{n: (n, {k: v for k, v in reducing(n, r=8).items() if k != "method"} | ({"seed": 0} if n in RANDOM else {}),
           spec.identity, n in MERGING) for n, spec in vit_methods().items()},
    "evit_nofuse": ("evit", dict(keep_rate=0.7, fuse=False), dict(keep_rate=1.0, fuse=False), False),
    "bat_chain_gauss": ("bat", dict(keep_rate=0.5, assign="chain", density="gaussian"), dict(keep_rate=1.0), True),
    "bat_kmeans": ("bat", dict(keep_rate=0.7, merger="kmeans", variant="cluster"), dict(keep_rate=1.0), True),
    "bat_pool": ("bat", dict(keep_rate=0.7, merger="pool"), dict(keep_rate=1.0), True),
    "bat_pack": ("bat", dict(keep_rate=0.7, variant="pack"), dict(keep_rate=1.0), True),
    "bat_attentive": ("bat", dict(keep_rate=0.7, variant="attentive"), dict(keep_rate=1.0), False),
    "bat_keys": ("bat", dict(keep_rate=0.7, feature="keys", merge_weight="mean"), dict(keep_rate=1.0), True),
}
SMALL = dict(DEIT_CFG, depth=4, embed_dim=24)  # 4 blocks: locations default to [1, 2, 3]


def build(name: str, reduce: bool = True, **cfg):
    method, on, off, _ = METHODS[name]
    torch.manual_seed(0)
    return dynavit.create_model("vit", method=method, **(on if reduce else off), **{**SMALL, **cfg}).eval()


def check_patch_map(info, num_patches: int, merging: bool) -> None:
    for count, p2t, sizes in zip(info.token_counts, info.patch_to_token, info.sizes):
        assert p2t.shape[1] == num_patches and int(p2t.max()) < count
        kept = p2t >= 0
        if merging:
            assert bool(kept.all()), "a merging method lost a patch"
        # every surviving token holds at least one patch and sizes count them
        for b in range(p2t.shape[0]):
            held = torch.bincount(p2t[b][kept[b]], minlength=count)
            if merging:
                assert bool((held >= 1).all())
                torch.testing.assert_close(sizes[b].float(), held.float())


CORE = [*vit_methods(), "evit_nofuse"]
GRID = [(1, 224, torch.float32), (33, 224, torch.bfloat16), (1, 384, torch.bfloat16), (33, 384, torch.float32)]
CASES = [(n, *g) for n in CORE for g in GRID] + [(n, *g) for n in METHODS if n not in CORE for g in GRID[1:3]]


@pytest.mark.parametrize("name,batch,img,dtype", CASES)
def test_runs_batch_resolution_dtype(name, batch, img, dtype):
    model = build(name, img_size=img).to(dtype)
    x = torch.randn(batch, 3, img, img, dtype=dtype)
    with torch.no_grad():
        out, info = model(x, return_info=True)
    assert out.shape == (batch, 10) and out.dtype == dtype and bool(torch.isfinite(out).all())
    assert info.token_counts and all(a > b for a, b in zip([model.num_patches] + info.token_counts,
                                                            info.token_counts))
    check_patch_map(info, model.num_patches, METHODS[name][3])


def test_every_method_is_classified():
    for name, spec in vit_methods().items():
        assert (name in PRUNING) != (name in MERGING), f"add {name!r} to conftest.PRUNING or MERGING"
        assert spec.identity is not None, f"{name!r} declares no identity parameters"


def load_dense(model, dense):
    """Dense weights into a method's model: every key fits, only the method's own modules stay missing."""
    report = model.load_state_dict(dense.state_dict(), strict=False)
    assert report.unexpected_keys == []
    assert all(k.split(".")[0] in model.method_modules for k in report.missing_keys), report.missing_keys


@pytest.mark.parametrize("name", list(METHODS))
def test_no_reduction_equals_dense(name):
    torch.manual_seed(0)
    dense = dynavit.create_model("vit", **SMALL).eval()
    model = build(name, reduce=False)
    load_dense(model, dense)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out, info = model(x, return_info=True)
        ref = dense(x)
    assert (out - ref).abs().max().item() <= 1e-5
    assert all(c == model.num_patches for c in info.token_counts)


@pytest.mark.parametrize("name", [*vit_methods(), "bat_kmeans"])
def test_backward_reaches_every_parameter(name):
    model = build(name).train()
    out = logits_of(model(torch.randn(2, 3, 224, 224)), 2)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize("name", [n for n, s in vit_methods().items() if s.primary == "keep_rate"])
def test_keep_rate_changes_at_run_time(name):
    model = build(name)
    x = torch.randn(1, 3, 224, 224)
    counts = []
    for rate in (1.0, 0.9, 0.5):
        model.reducer.set_keep_rate(rate)
        with torch.no_grad():
            counts.append(model(x, return_info=True)[1].token_counts)
    assert counts[0] == [196] * 3 and counts[1][0] > counts[2][0]
    with pytest.raises(dynavit.ConfigError, match="keep_rate"):
        model.reducer.set_keep_rate(1.5)


def test_distilled_prefix_tokens_untouched():
    for name in ("evit", "tome", "bat"):
        model = build(name, distilled=True)
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            out, info = model(x, return_info=True)
        assert out.shape == (2, 10)
        check_patch_map(info, model.num_patches, True)


def test_locations_and_lvvit_defaults():
    lv = dynavit.create_model("lvvit", method="bat", keep_rate=0.7, embed_dim=48, num_heads=3, num_classes=10)
    assert lv.reducer.locations == (4, 8, 12)  # LV-ViT-S's published GMACs (tests/test_bat_fidelity.py)
    assert dynavit.create_model("tiny_vit", method="evit").reducer.locations == (3, 6, 9)
    with torch.no_grad():
        _, info = lv.eval()(torch.randn(1, 3, 224, 224), return_info=True)
    assert info.token_counts == [138, 97, 68]  # budget="logs" at 0.7: K tokens per stage
    with pytest.raises(dynavit.ConfigError, match="locations"):
        dynavit.create_model("tiny_vit", method="bat", locations=[6, 3])


class _Shuffle(TokenReducer):
    """At block 1: every token kept in reversed order (select_tokens); at block 2: every token its own group
    (merge_tokens). Both change nothing a ViT computes, through the real reduction path (no early return)."""

    def after_attention(self, model, i, state, cls_attn, keys):
        T = state.num_tokens
        if i == 1:
            state = select_tokens(state, torch.arange(T - 1, -1, -1).expand(state.x.shape[0], T))
        elif i == 2:
            group = torch.arange(T).expand(state.x.shape[0], T)
            state = merge_tokens(state, group, torch.ones(state.x.shape[0], T), T)
        else:
            return state
        state.record_stage()
        return state


def test_identity_reductions_through_the_shared_mechanics_equal_dense():
    torch.manual_seed(0)
    dense = dynavit.create_model("vit", **SMALL).eval()
    model = dynavit.create_model("vit", **SMALL).eval()
    model.load_state_dict(dense.state_dict())
    model.reducer = _Shuffle()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out, info = model(x, return_info=True)
        ref = dense(x)
    assert (out - ref).abs().max().item() <= 1e-5
    assert info.token_counts == [196, 196] and bool((info.patch_to_token[0][:, 0] == 195).all())


def test_attention_extras_are_declared():
    """A method asks each block's attention only for the extras its spec declares (bench / export rely on it)."""
    for name, spec in vit_methods().items():
        model = build(name)
        asked = set()
        hook = model.reducer.attention_args

        def spy(i, state, _hook=hook):
            kw = _hook(i, state)
            asked.update(kw)
            return kw

        model.reducer.attention_args = spy
        for train in (False, True):
            model.train(train)
            model(torch.randn(2, 3, 224, 224))
        assert asked <= set(spec.attention_extras), (name, asked)


def test_apply_method_twice_refuses_and_remove_method_detaches_cleanly():
    model = dynavit.create_model("vit", method="dynamicvit", **SMALL)
    assert any(k.startswith("score_predictor.") for k in model.state_dict())
    with pytest.raises(dynavit.ConfigError, match="already has method 'dynamicvit'.*remove_method"):
        dynavit.apply_method(model, "evit", keep_rate=0.5)
    dense_keys = set(dynavit.create_model("vit", **SMALL).state_dict())
    dynavit.remove_method(model)
    assert model.reducer is None and set(model.state_dict()) == dense_keys  # no stale predictor keys
    dynavit.apply_method(model, "evit", keep_rate=0.5)
    assert model.reducer.name == "evit" and model.method_modules == () and set(model.state_dict()) == dense_keys
    dynavit.remove_method(model)
    dynavit.apply_method(model, "dynamicvit")
    assert len(model.score_predictor) == 3 and model.method_modules == ("score_predictor",)


def test_registry_refuses_a_silent_overwrite(monkeypatch):
    from dynavit import registry

    list_methods()
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    with pytest.raises(dynavit.ConfigError, match="'evit' is already registered"):
        dynavit.register_method("evit", params=("keep_rate",))(lambda model, keep_rate=0.5: model)
    with pytest.warns(UserWarning, match="replaced"):
        dynavit.register_method("evit", params=("keep_rate",), override=True)(lambda model, keep_rate=0.5: model)
    with pytest.raises(dynavit.ConfigError, match="already registered"):
        registry.register_model(_tiny_vit_again)


def _tiny_vit_again(**kwargs):
    return None


_tiny_vit_again.__name__ = "tiny_vit"


def test_info_fields_are_documented():
    """Every info.extra key a forward records is documented in its spec (`dynavit info` prints the meanings)."""
    from dynavit.registry import family_of

    for name, spec in vit_methods().items():
        with torch.no_grad():
            _, info = build(name)(torch.randn(1, 3, 224, 224), return_info=True)
        assert set(info.extra) <= set(spec.info_fields), (name, sorted(info.extra))
    dit = dynavit.create_model("dit_tiny", img_size=64).eval()
    with torch.no_grad():
        _, info = dit(torch.randn(1, 3, 64, 64), return_info=True)
    assert info.extra and set(info.extra) <= set(family_of("dit_tiny").info_fields)
