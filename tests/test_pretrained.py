"""`pretrained=True` without network: a Hugging Face cache laid out on disk by the test (HF_HUB_OFFLINE=1), and a
local HTTP server on 127.0.0.1 standing in for the authors' release hosts (DYNAVIT_WEIGHTS_BASE_URL)."""
from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from safetensors.torch import save_file

import dynavit
from dynavit import pretrained as P
from dynavit.errors import CheckpointError, ConfigError, MissingExtraError, WeightsUnavailableError

torch.set_num_threads(1)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hf_cache(hub_dir, repo: str, tensors: dict, filename: str = "model.safetensors"):
    """The Hugging Face hub cache layout: models--{org}--{name}/refs/main -> snapshots/<commit>/<file>."""
    folder = hub_dir / ("models--" + repo.replace("/", "--"))
    (folder / "snapshots" / COMMIT).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "snapshots" / COMMIT / filename))


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub", reason="the 'hub' extra (huggingface_hub) is not installed")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", ["pvt_v2_b0", "deit_tiny_distilled_patch16_224"])
def test_pretrained_from_hf_cache_offline(hf_home, name):
    src = dynavit.create_model(name)
    repo = P.select(name).hf_repo
    assert repo == f"timm/{name}." + ("in1k" if name.startswith("pvt") else "fb_in1k")
    lay_out_hf_cache(hf_home, repo, src.state_dict())
    model = dynavit.create_model(name, pretrained=True)
    assert model.pretrained_weights == repo
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(_logits(src, x), _logits(model, x))


def test_pretrained_with_other_num_classes_keeps_fresh_head(hf_home):
    src = dynavit.create_model("pvt_v2_b0")
    lay_out_hf_cache(hf_home, "timm/pvt_v2_b0.in1k", src.state_dict())
    with pytest.warns(UserWarning, match="classifier"):
        model = dynavit.create_model("pvt_v2_b0", pretrained=True, num_classes=10)
    assert model.head.out_features == 10
    assert torch.equal(model.patch_embed.proj.weight, src.patch_embed.proj.weight)


def test_pretrained_dense_backbone_under_a_method(hf_home):
    """EViT has no parameters: the dense weights load strictly; DynamicViT at a keep rate without a release
    gets the dense backbone and fresh predictors (with a warning saying so)."""
    src = dynavit.create_model("deit_tiny_patch16_224")
    lay_out_hf_cache(hf_home, "timm/deit_tiny_patch16_224.fb_in1k", src.state_dict())
    evit = dynavit.create_model("deit_tiny_patch16_224", method="evit", keep_rate=0.7, pretrained=True)
    assert torch.equal(evit.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    with pytest.warns(UserWarning, match="score_predictor"):
        dyn = dynavit.create_model("deit_tiny_patch16_224", method="dynamicvit", keep_rate=0.7, pretrained=True)
    assert torch.equal(dyn.pos_embed, src.pos_embed)


def test_dit_starts_from_its_pvt_v2_twin(hf_home):
    src = dynavit.create_model("pvt_v2_b0")
    lay_out_hf_cache(hf_home, "timm/pvt_v2_b0.in1k", src.state_dict())
    with pytest.warns(UserWarning, match="gates"):
        dit = dynavit.create_model("dit_b0", pretrained=True)
    assert dit.pretrained_weights == "timm/pvt_v2_b0.in1k"
    assert torch.equal(dit.stages[3].blocks[1].mlp.fc2.weight, src.stages[3].blocks[1].mlp.fc2.weight)
    dit.force_gates("pvt_v2")  # every token on PVTv2's route: the dense twin
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(_logits(dit, x), _logits(src, x), atol=1e-5, rtol=1e-5)


def test_hf_cache_offline_in_a_fresh_process(hf_home, tmp_path):
    """HF_HOME / HF_HUB_OFFLINE set before huggingface_hub is imported, through the CLI (`--pretrained`)."""
    lay_out_hf_cache(hf_home, "timm/pvt_v2_b0.in1k", dynavit.create_model("pvt_v2_b0").state_dict())
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "dynavit", "flops", "--model", "pvt_v2_b0", "--pretrained"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "pvt_v2_b0 (dense): 0.5" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "dynavit", "flops", "--model", "pvt_v2_b1", "--pretrained"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    err = missing.stderr.strip()
    assert err.count("\n") == 0 and "timm/pvt_v2_b1.in1k" in err and "hf download" in err and "Traceback" not in err


def test_hf_not_cached_is_one_clear_error(hf_home):
    with pytest.raises(WeightsUnavailableError) as e:
        dynavit.create_model("deit_small_patch16_224", pretrained=True)
    msg = str(e.value)
    assert "timm/deit_small_patch16_224.fb_in1k" in msg and "hf download" in msg and "HF_HUB_OFFLINE=1" in msg


def test_missing_hub_extra_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MissingExtraError, match=r'pip install "dynavit\[hub\]"'):
        dynavit.create_model("pvt_v2_b0", pretrained=True)


def test_no_weights_for_name_is_a_config_error():
    with pytest.raises(ConfigError, match="no released weights for model 'tiny_vit'"):
        dynavit.create_model("tiny_vit", pretrained=True)


def test_select_picks_the_release_for_method_and_keep_rate():
    assert P.select("deit_small_patch16_224", "dynamicvit", 0.7).file_name == "dynamicvit_deit-s_0.7.pth"
    assert P.select("lvvit_s", "dynamicvit", 0.5).keep_rate == 0.5
    assert P.select("lvvit_s", "dynamicvit", 0.6).method is None  # no release: the dense backbone
    assert P.select("deit_small_patch16_224", "evit", 0.7).hf_repo == "timm/deit_small_patch16_224.fb_in1k"
    assert P.select("lvvit_m").file_name == "lvvit_m-56M-224-84.0.pth.tar"


def test_release_table_names_registered_models():
    names = set(dynavit.list_models())
    table = P.registry()
    assert {w.model for w in table} <= names
    files = [w.file_name for w in table if w.url]
    assert len(files) == len(set(files))
    assert {w.model for w in table if w.hf_repo} == {
        *(f"pvt_v2_b{i}" for i in range(6)), "deit_tiny_patch16_224", "deit_small_patch16_224",
        "deit_base_patch16_224", "deit_base_patch16_384", "deit_tiny_distilled_patch16_224",
        "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224", "deit_base_distilled_patch16_384"}
    assert all(w.origin for w in table)


# ---------------------------------------------------------------- the authors' URLs, from a local server
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(P.BASE_URL_ENV, f"http://127.0.0.1:{httpd.server_address[1]}/releases")
    (root / "releases").mkdir()
    yield root / "releases"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def tiny_release(monkeypatch):
    """A DynamicViT release of tiny_vit at keep rate 0.7, in the authors' .pth layout ({'model': state dict})."""
    w = P.Weights("tiny_vit", url="https://example.invalid/tiny.pth", file_name="dynamicvit_tiny_0.7.pth",
                  method="dynamicvit", keep_rate=0.7, num_classes=10, origin="test")
    monkeypatch.setattr(P, "_TABLE", [*P._TABLE, w])
    return w


def test_url_release_downloads_into_torch_hub_cache(server, tiny_release, tmp_path):
    src = dynavit.create_model("tiny_vit", method="dynamicvit", keep_rate=0.7)
    torch.save({"model": src.state_dict(), "epoch": 29}, server / tiny_release.file_name)
    model = dynavit.create_model("tiny_vit", method="dynamicvit", keep_rate=0.7, pretrained=True)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / tiny_release.file_name
    assert cached.exists() and cached.with_name(cached.name + ".sha256").exists()
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(_logits(src, x), _logits(model, x))
    (server / tiny_release.file_name).unlink()  # the cache alone serves it now
    again = dynavit.create_model("tiny_vit", method="dynamicvit", keep_rate=0.7, pretrained=True)
    assert torch.equal(_logits(src, x), _logits(again, x))
    cached.write_bytes(cached.read_bytes()[:-8] + b"\0" * 8)  # corrupted after the first download
    with pytest.raises(CheckpointError, match="recorded at its first download"):
        dynavit.create_model("tiny_vit", method="dynamicvit", keep_rate=0.7, pretrained=True)


def test_url_release_with_published_hash_is_checked(server, tiny_release, monkeypatch):
    src = dynavit.create_model("tiny_vit", method="dynamicvit", keep_rate=0.7)
    torch.save({"model": src.state_dict()}, server / tiny_release.file_name)
    bad = P.Weights(**{**tiny_release.__dict__, "sha256": "0" * 64})
    monkeypatch.setattr(P, "_TABLE", [*P._TABLE[:-1], bad])
    with pytest.raises(CheckpointError, match="expected 0000000000000000... \\(published\\)"):
        dynavit.create_model("tiny_vit", method="dynamicvit", keep_rate=0.7, pretrained=True)


def test_url_unreachable_is_one_clear_error(server, tiny_release):
    with pytest.raises(WeightsUnavailableError) as e:  # the server has no such file: HTTP 404
        dynavit.create_model("tiny_vit", method="dynamicvit", keep_rate=0.7, pretrained=True)
    msg = str(e.value)
    assert "dynamicvit_tiny_0.7.pth" in msg and "curl -L -o" in msg and "https://example.invalid/tiny.pth" in msg
    assert "hub/checkpoints" in msg


def test_cli_models_marks_names_with_weights(capsys):
    from dynavit.cli import main

    assert main(["models"]) == 0
    lines = {line.split()[1] if line.startswith("  *") else line.split()[0]: line
             for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and "params:" not in line}
    assert lines["deit_small_patch16_224"].startswith("  *") and "dynamicvit 0.7" in lines["deit_small_patch16_224"]
    assert lines["pvt_v2_b3"].startswith("  *") and "timm/pvt_v2_b3.in1k" in lines["pvt_v2_b3"]
    assert not lines["tiny_vit"].startswith("  *") and not lines["deit_small_patch16_384"].startswith("  *")


def test_cli_pretrained_flag_reaches_create_model(monkeypatch, capsys):
    from dynavit.cli import main

    seen = {}
    real = dynavit.registry.create_model

    def spy(name, method=None, **kw):
        seen.update(kw)
        kw.pop("pretrained", None)
        return real(name, method=method, **kw)

    monkeypatch.setattr(dynavit.registry, "create_model", spy)
    assert main(["flops", "--model", "tiny_vit", "--img-size", "64", "--pretrained"]) == 0
    assert seen.get("pretrained") is True
