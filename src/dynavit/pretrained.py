"""Released weights by model name: `create_model(name, pretrained=True)` and `--pretrained` on the CLI.

Two kinds of source, each recorded with where its id / URL was read (docs/pretrained.md lists them all):
- timm's repositories on the Hugging Face Hub (`timm/<name>.<tag>`, file `model.safetensors`), fetched with
  `huggingface_hub` (the `hub` extra): its cache, `HF_HOME` / `HF_HUB_CACHE`, and `HF_HUB_OFFLINE=1` (read at
  call time, so the cache alone serves the files);
- the authors' release URLs (LV-ViT, DynamicViT), downloaded into torch's hub cache
  (`torch.hub.get_dir()/checkpoints`, i.e. `$TORCH_HOME/hub/checkpoints`), checked against a SHA-256, read with
  `weights_only=True`. The authors publish no hashes: an entry without one records the hash of its first
  download beside the file (`<file>.sha256`) and every later load is checked against it.
  `DYNAVIT_WEIGHTS_BASE_URL` replaces the hosts (`<base>/<file name>`), for mirrors and for tests.

A DynamicViT release is picked when `method="dynamicvit"` and the keep rate match it; any other method
(or a keep rate without a release) starts from the dense backbone's weights (DynamicViT's predictors then
stay freshly initialised, as in the authors' training from DeiT / LV-ViT).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.hub
from torch import nn

from .checkpoint import filter_state_dict, load_state_dict, read_checkpoint
from .errors import CheckpointError, ConfigError, WeightsUnavailableError
from .extras import require

BASE_URL_ENV = "DYNAVIT_WEIGHTS_BASE_URL"
CLASSIFIER_PREFIXES = ("head.", "head_dist.", "aux_head.")


@dataclass(frozen=True)
class Weights:
    """One released checkpoint of a registered model (optionally with its method and keep rate)."""

    model: str
    hf_repo: Optional[str] = None  # Hugging Face repository id; hf_file inside it
    hf_file: str = "model.safetensors"
    url: Optional[str] = None  # the authors' URL; saved as file_name in torch's hub cache
    file_name: Optional[str] = None
    sha256: Optional[str] = None  # None: the authors publish none (checked against the first download)
    method: Optional[str] = None
    keep_rate: Optional[float] = None
    num_classes: int = 1000
    origin: str = ""  # where the id / URL was read

    @property
    def label(self) -> str:
        return self.hf_repo if self.hf_repo else self.url

    @property
    def tag(self) -> str:
        return f"{self.method} {self.keep_rate}" if self.method else "dense"


_TIMM_DEIT = "huggingface/pytorch-image-models timm/models/deit.py default_cfgs (hf_hub_id='timm/')"
_TIMM_PVT = "huggingface/pytorch-image-models timm/models/pvt_v2.py default_cfgs (hf_hub_id='timm/')"
_LVVIT = ("zihangJiang/TokenLabeling tlt/models/lvvit.py default_cfgs; raoyongming/DynamicViT README "
          "'Model preparation'")
_DYVIT = "raoyongming/DynamicViT README 'Model Zoo' (Tsinghua Cloud links; the Google Drive ones need a browser)"

_TABLE = [
    *(Weights(m, hf_repo=f"timm/{m}.fb_in1k", origin=_TIMM_DEIT) for m in (
        "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "deit_base_patch16_384",
        "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224",
        "deit_base_distilled_patch16_384")),
    *(Weights(f"pvt_v2_b{i}", hf_repo=f"timm/pvt_v2_b{i}.in1k", origin=_TIMM_PVT) for i in range(6)),
    Weights("lvvit_s", url="https://github.com/zihangJiang/TokenLabeling/releases/download/1.0/"
            "lvvit_s-26M-224-83.3.pth.tar", file_name="lvvit_s-26M-224-83.3.pth.tar", origin=_LVVIT),
    Weights("lvvit_m", url="https://github.com/zihangJiang/TokenLabeling/releases/download/1.0/"
            "lvvit_m-56M-224-84.0.pth.tar", file_name="lvvit_m-56M-224-84.0.pth.tar", origin=_LVVIT),
    Weights("deit_small_patch16_224", url="https://cloud.tsinghua.edu.cn/f/698896dfbcea430b9591/?dl=1",
            file_name="dynamicvit_deit-s_0.7.pth", method="dynamicvit", keep_rate=0.7, origin=_DYVIT),
    Weights("deit_base_patch16_224", url="https://cloud.tsinghua.edu.cn/f/660f27ddb6b945a797a8/?dl=1",
            file_name="dynamicvit_deit-b_0.7.pth", method="dynamicvit", keep_rate=0.7, origin=_DYVIT),
    Weights("lvvit_s", url="https://cloud.tsinghua.edu.cn/f/635cb172312749e39cf2/?dl=1",
            file_name="dynamicvit_lvvit-s_0.5.pth", method="dynamicvit", keep_rate=0.5, origin=_DYVIT),
    Weights("lvvit_s", url="https://cloud.tsinghua.edu.cn/f/d732a3511dd64db598e1/?dl=1",
            file_name="dynamicvit_lvvit-s_0.7.pth", method="dynamicvit", keep_rate=0.7, origin=_DYVIT),
    Weights("lvvit_m", url="https://cloud.tsinghua.edu.cn/f/b8d1efdfc41d4777903e/?dl=1",
            file_name="dynamicvit_lvvit-m_0.7.pth", method="dynamicvit", keep_rate=0.7, origin=_DYVIT),
]


def registry() -> list:
    """Every known release (a copy: tests and users may extend it through `register_weights`)."""
    return list(_TABLE)


def register_weights(w: Weights) -> None:
    """Add a release (e.g. your own mirror of a model) to the table `pretrained=True` looks in."""
    _TABLE.append(w)


TWINS = {f"dit_b{i}": f"pvt_v2_b{i}" for i in range(6)}  # DiT starts from its PVTv2 twin's weights (gates fresh)


def weights_for(model: str) -> list:
    """The releases of `model` (for a DiT: its PVTv2 twin's), dense first."""
    model = TWINS.get(model, model)
    return sorted((w for w in _TABLE if w.model == model), key=lambda w: (w.method is not None, w.keep_rate or 0))


def select(model: str, method: Optional[str] = None, keep_rate=None) -> Weights:
    """The release `create_model(model, method, keep_rate=..., pretrained=True)` loads (see module doc)."""
    found = weights_for(model)
    if not found:
        known = sorted({w.model for w in _TABLE})
        raise ConfigError(f"no released weights for model {model!r}; models with weights: {', '.join(known)} "
                          f"(or load your own with checkpoint=...)")
    if method not in (None, "dense"):
        rate = keep_rate if not isinstance(keep_rate, (list, tuple)) else None
        for w in found:
            if w.method == method and rate is not None and abs(float(rate) - w.keep_rate) < 1e-9:
                return w
    dense = [w for w in found if w.method is None]
    if not dense:
        raise ConfigError(f"model {model!r} has only method-specific releases: "
                          + ", ".join(f"{w.method} keep_rate={w.keep_rate}" for w in found))
    return dense[0]


# ---------------------------------------------------------------- fetching
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def fetch_hf(repo: str, filename: str) -> Path:
    """Path of `filename` of Hugging Face repository `repo`, from the cache or downloaded into it."""
    require("hub", f"pretrained weights from the Hugging Face Hub ({repo})")
    from huggingface_hub import hf_hub_download

    offline = _env_true("HF_HUB_OFFLINE")
    cache = hf_cache_dir()
    try:
        return Path(hf_hub_download(repo, filename, cache_dir=str(cache), local_files_only=offline))
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError, HTTP / connection errors, missing repo
        why = "HF_HUB_OFFLINE=1 and the file is not in the cache" if offline else \
            f"not in the cache and the download failed ({type(e).__name__})"
        raise WeightsUnavailableError(
            f"cannot get {filename} of Hugging Face repo {repo!r}: {why}. Cache: {cache}. Pre-download it where "
            f"there is network with `hf download {repo} {filename}` (older huggingface_hub: `huggingface-cli "
            f"download {repo} {filename}`), copy the cache folder here (set HF_HOME / HF_HUB_CACHE to it), and "
            f"run with HF_HUB_OFFLINE=1") from None


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_hash(path: Path, w: Weights) -> None:
    """Compare the file with the table's SHA-256, or with the one recorded at its first download."""
    record = path.with_name(path.name + ".sha256")
    digest = _sha256(path)
    expected = w.sha256 or (record.read_text().split()[0] if record.exists() else None)
    if expected is None:
        record.write_text(f"{digest}  {path.name}\n")
        return
    if not digest.startswith(expected.lower()):
        raise CheckpointError(f"{str(path)!r} has SHA-256 {digest[:16]}..., expected {expected[:16]}... "
                              f"({'published' if w.sha256 else 'recorded at its first download'}): a corrupt or "
                              f"replaced file; delete it to download it again")


def fetch_url(w: Weights, progress: bool = True) -> Path:
    """Path of release `w` in torch's hub cache, downloaded from its URL (or DYNAVIT_WEIGHTS_BASE_URL) if absent."""
    dest = torch_hub_checkpoints() / w.file_name
    base = os.environ.get(BASE_URL_ENV)
    url = f"{base.rstrip('/')}/{w.file_name}" if base else w.url
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(dest), progress=progress)
        except (OSError, ValueError) as e:  # URLError / HTTPError / socket errors
            raise WeightsUnavailableError(
                f"cannot download {url} ({type(e).__name__}: {e}) and {str(dest)!r} is not in torch's hub cache. "
                f"Pre-download it where there is network (`curl -L -o {w.file_name} '{w.url}'`), then put it at "
                f"{dest} (set TORCH_HOME to choose the cache) or set {BASE_URL_ENV} to a mirror") from None
    _check_hash(dest, w)
    return dest


def fetch(w: Weights, progress: bool = True) -> Path:
    """Local path of release `w` (cached or downloaded)."""
    return fetch_hf(w.hf_repo, w.hf_file) if w.hf_repo else fetch_url(w, progress)


def _prefixes(keys: list) -> str:
    """'gates.*' / 'score_predictor.*': the top-level modules of a list of state-dict keys."""
    return ", ".join(sorted({k.split(".")[0] + ".*" for k in keys}))


def load_pretrained(model: nn.Module, w: Weights, progress: bool = True) -> None:
    """Load release `w` into `model`: strictly, except the classifier when `model` has another number of
    classes (then the heads keep their fresh initialisation, as timm does), a method's own parts when `w` is
    the dense backbone's release, and what a model has beyond its twin when `w` is the twin's release."""
    path = fetch(w, progress)
    sd = filter_state_dict(read_checkpoint(path), model)
    fresh = []
    reset_head = getattr(model, "num_classes", w.num_classes) != w.num_classes
    if reset_head:
        sd = {k: v for k, v in sd.items() if not k.startswith(CLASSIFIER_PREFIXES)}
        fresh.append(f"classifier ({model.num_classes} classes; the release has {w.num_classes})")
    target = model.state_dict()
    head = CLASSIFIER_PREFIXES if reset_head else ()
    missing = [k for k in target if k not in sd and not k.startswith(head)]
    # a release of the model's twin (a DiT from its PVTv2's): the parts the twin has not are fresh
    twin = missing if w.model != getattr(model, "model_name", w.model) else []
    if twin:
        fresh.append(f"{len(twin)} tensors its twin {w.model} has not ({_prefixes(twin)}; the release is the twin's)")
    # the dense backbone's release under a method: the method's own parts (DynamicViT's predictors) are fresh
    # (a DiT's gates are its own such tensors too: already said above when the release is its twin's)
    method_only = [k for k in getattr(model, "method_state_keys", ()) if k in missing and k not in twin] \
        if w.method is None else []
    if method_only:
        owner = getattr(model, "method_name", None) or getattr(model, "family", type(model).__name__)
        fresh.append(f"{len(method_only)} tensors of method {owner} ({_prefixes(method_only)})")
    allowed = set(twin) | set(method_only)
    fits = (all(k in sd or k in allowed or k.startswith(head) for k in target) and all(k in target for k in sd)
            and all(sd[k].shape == target[k].shape for k in sd))
    load_state_dict(model, sd, strict=not fits, source=repr(str(path)))  # strict: raises the full error
    if fresh:
        warnings.warn(f"{w.label} loaded into {getattr(model, 'model_name', type(model).__name__)}; freshly "
                      f"initialised: {'; '.join(fresh)}", stacklevel=3)
    model.pretrained_weights = w.label
