"""Shared test helpers: the authors' reference fixtures (../shared/fixtures/reference-v1) and tiny models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "reference-v1"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (shared/ must sit beside the repository)")
    return path


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

# A small ViT (16 patches, 12 blocks) for export / compile / property tests, and one case per fixed-count method.
TINY64_CFG = dict(img_size=64, patch_size=16, embed_dim=48, depth=12, num_heads=3, num_classes=10)
FIXED_COUNT_METHODS = {
    "dense": dict(),
    "dynamicvit": dict(method="dynamicvit", keep_rate=0.7),
    "evit": dict(method="evit", keep_rate=0.7),
    "bat": dict(method="bat", keep_rate=0.7),
    "tome": dict(method="tome", r=1),
}
