"""Shared test helpers: the authors' reference fixtures (../shared/fixtures/reference-v1 and tpami-v1), tiny
models, a noiseless Gumbel-softmax."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# the fixtures folder beside the repository, or where DYNAVIT_FIXTURES says (a git worktree elsewhere)
FIXTURES_ROOT = Path(os.environ.get("DYNAVIT_FIXTURES", REPO.parent / "shared" / "fixtures"))
FIXTURES = FIXTURES_ROOT / "reference-v1"  # DynamicViT, EViT, ToMe, BAT: the authors' code's outputs
TPAMI = FIXTURES_ROOT / "tpami-v1"  # DynamicCNN / DynamicSwin

torch.set_num_threads(1)  # the whole session: tiny models, a shared CPU (no test module sets it itself)


@pytest.fixture(autouse=True)
def _one_thread():
    yield
    torch.set_num_threads(1)  # a test that changed it (a bench with --threads) leaves the next at one thread


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fixture_path(name: str, folder: Path = FIXTURES) -> Path:
    path = folder / name
    if not path.exists():
        pytest.skip(f"reference fixtures not found at {folder} (shared/ must sit beside the repository, or set "
                    f"DYNAVIT_FIXTURES to the fixtures folder)")
    return path


def straight_through_argmax(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
    """Noiseless stand-in for F.gumbel_softmax(hard=True): hard argmax forward, softmax gradient."""
    soft = logits.softmax(dim)
    hard_y = torch.zeros_like(soft).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
    return hard_y - soft.detach() + soft


@pytest.fixture
def noiseless(monkeypatch):
    """Gumbel-softmax decisions without the noise (DynamicViT-family training made deterministic)."""
    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", straight_through_argmax)


@pytest.fixture(scope="session")
def ref():
    """The reference tensors produced by the authors' code."""
    from safetensors.torch import load_file

    return load_file(str(fixture_path("reference.safetensors")))


@pytest.fixture(scope="session")
def ref_meta():
    return json.loads(fixture_path("meta.json").read_text())


@pytest.fixture(scope="session")
def ref_images(ref):
    """The fixture's model input: x = (uint8 / 255 - 0.5) / 0.25."""
    return (ref["images_u8"].float() / 255 - 0.5) / 0.25


# The fixture's backbones (meta.json): 224 px, patch 16, width 48, 3 heads, 10 classes.
DEIT_CFG = dict(img_size=224, patch_size=16, embed_dim=48, depth=12, num_heads=3, mlp_ratio=4.0, num_classes=10)
LVVIT_CFG = dict(img_size=224, patch_size=16, embed_dim=48, depth=16, num_heads=3, mlp_ratio=3.0, num_classes=10)

# A small ViT (16 patches, 12 blocks) for export / compile / property tests.
TINY64_CFG = dict(img_size=64, patch_size=16, embed_dim=48, depth=12, num_heads=3, num_classes=10)

# Method lists come from the registry. What the tests need to know per method: a value of its primary
# parameter that really reduces, whether it drops patches (pruning) or merges them (no patch lost), and whether
# it draws at random. A registered method missing from PRUNING / MERGING fails `test_every_method_is_classified`.
PRUNING = {"dynamicvit", "topk", "random"}
MERGING = {"evit", "bat", "tome"}
RANDOM = {"random"}


def vit_methods() -> dict:
    """The registered methods for ViT-family models (the token-reduction contract); the hierarchical ones
    (families convnext / swin) have their own tests."""
    from dynavit.registry import list_methods

    return {n: s for n, s in list_methods().items() if "vit" in s.families}


def reducing(name: str, keep: float = 0.7, r: int = 1) -> dict:
    """create_model kwargs of method `name` at a real reduction (keep rate `keep`, or ToMe-style `r`)."""
    primary = vit_methods()[name].primary
    return {"method": name, primary: {"keep_rate": keep, "r": r}[primary]}


# one case per fixed-count, deterministic method (export, compile), plus the dense model
FIXED_COUNT_METHODS = {"dense": dict(), **{n: reducing(n) for n in vit_methods() if n not in RANDOM}}
