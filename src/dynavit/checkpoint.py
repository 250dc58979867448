"""Reading and writing checkpoints: safetensors by default, `.pth` only with `weights_only=True`.

All key conversions live in one filter (`filter_state_dict`), like timm's `checkpoint_filter_fn`: unwrapping
`{'model': ...}` / `state_dict` / `state_dict_ema` / `model_ema`, stripping `module.` (DDP) and `_orig_mod.`
(torch.compile) prefixes, Hugging Face ViT/DeiT names (docs/methods.md 1.1) and `pos_embed` resampling for a new
image size. A checkpoint that still does not fit raises one `CheckpointError` that lists what is wrong.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import stat
import pickle
import pickletools
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import CheckpointError, CheckpointNotFoundError

PathLike = Union[str, os.PathLike]
_WRAPPER_KEYS = ("model", "state_dict", "state_dict_ema", "model_ema", "module")


@dataclass
class LoadReport:
    """What `load_checkpoint` did: keys left at their initial value, keys ignored, keys converted."""

    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # (key, checkpoint shape, model shape)
    converted: list = field(default_factory=list)  # human-readable notes (HF names, pos_embed resampled, ...)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def read_checkpoint(path: PathLike) -> dict:
    """Load the raw object stored at `path` (a dict), safely. Raises CheckpointNotFoundError / CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {str(path)!r}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is a directory; give the .safetensors or .pth file")
    _check_readable(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors file {str(path)!r} (truncated or corrupt?): {e}") from None
    try:
        # DeiT's / DynamicViT's training scripts save {'model': ..., 'args': argparse.Namespace(...)}: the Namespace
        # (a plain attribute bag) is the one class allowed beyond weights_only's tensors, numbers and containers
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except PermissionError as e:
        raise CheckpointError(f"permission denied reading checkpoint {str(path)!r}: {e.strerror}") from None
    except pickle.UnpicklingError as e:
        modules = [g for g in pickled_globals(path) if g.startswith("torch.nn.modules.")]
        if modules:
            raise CheckpointError(
                f"refused to load {str(path)!r}: it holds a pickled nn.Module (the whole model object, as "
                f"torch.save(model) writes: {', '.join(modules[:3])}{', ...' if len(modules) > 3 else ''}), not a "
                f"state dict; unpickling it would run code and needs the original class definitions. Convert it "
                f"once, where the original code is installed and only if you trust the file: python -c \"import "
                f"torch; m = torch.load('{path.name}', weights_only=False); m = getattr(m, 'module', m); "
                f"torch.save(m.state_dict() if hasattr(m, 'state_dict') else {{k: v.state_dict() for k, v in "
                f"m.items()}}, '{path.stem}_state_dict.pth')\", then load that file") from None
        raise CheckpointError(
            f"refused to load {str(path)!r}: it holds Python objects beyond plain tensors and numbers, and "
            f"unpickling them could run arbitrary code (dynavit only loads with weights_only=True). Re-save the "
            f"state dict alone, or convert it to safetensors. Detail: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} (truncated or corrupt?): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _check_readable(path: Path) -> None:
    """A file this process may not read is a permission error, named as such (safetensors reports it as
    'No such file or directory')."""
    if not os.access(path, os.R_OK):
        st = path.stat()
        raise CheckpointError(f"permission denied reading checkpoint {str(path)!r} (mode {stat.filemode(st.st_mode)}, "
                              f"owner uid {st.st_uid}); ask its owner to make it readable (chmod a+r)")
    try:
        with open(path, "rb"):
            pass
    except PermissionError as e:
        raise CheckpointError(f"permission denied reading checkpoint {str(path)!r}: {e.strerror}") from None


def current_umask() -> int:
    """The process umask (read without changing it where /proc says it, else set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pickled_globals(path: PathLike, limit: int = 200) -> list:
    """'module.Name' of the classes / functions a torch.save file references, read with pickletools (nothing runs).

    Used only to explain a refused file (e.g. a pickled nn.Module); returns [] for anything it cannot parse.
    """
    def scan(data: bytes) -> list:
        found, recent, memo = [], [], {}
        stream = io.BytesIO(data)
        for _ in range(5):  # zip format: one pickle; legacy format: magic, protocol, sys info, then the object
            if stream.tell() >= len(data) or len(found) >= limit:
                break
            try:
                ops = list(pickletools.genops(stream))
            except Exception:  # a truncated or foreign stream: report what was seen
                break
            for op, arg, _ in ops:
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    recent.append(arg)
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = recent[-1] if recent else None
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    recent.append(memo.get(arg))
                elif op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(recent) >= 2:
                    found.append(f"{recent[-2]}.{recent[-1]}")
        return found[:limit]

    try:
        path = Path(path)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                return scan(zf.read(name)) if name else []
        return scan(path.read_bytes()[:64 << 20])  # legacy format: the first pickles hold the object
    except (OSError, zipfile.BadZipFile, KeyError):
        return []


def unwrap_state_dict(obj: Mapping) -> dict:
    """Return the tensor dict inside the usual wrappers ({'model': ...}, {'state_dict': ...}, EMA copies)."""
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            return dict(inner)
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"no tensors found in checkpoint (top-level keys: {sorted(obj)[:10]})")
    return tensors


def rename_key(key: str, rules, first_only: bool = True) -> str:
    """Rename a state-dict key by (regex, replacement) rules: the first rule that matches at the start of the key
    (`first_only`, for tables of exclusive prefixes), or every rule in turn (for chained renames)."""
    for pattern, repl in rules:
        if not first_only:
            key = re.sub(pattern, repl, key)
        elif re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return key


_HF_RULES = [  # (pattern, replacement), applied after the 'vit.' / 'deit.' prefix is removed
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.distillation_token$", "dist_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    # transformers >= 5 names the same tensors differently (the Hub's files keep the names above)
    (r"^layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
    (r"^cls_classifier\.", "head."),
    (r"^distillation_classifier\.", "head_dist."),
]
_HF_QKV = re.compile(r"^(?:encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)|"
                     r"layers\.(\d+)\.attention\.(q|k|v)_proj)\.(weight|bias)$")
_HF_QKV_PART = {"q": "query", "k": "key", "v": "value"}


def convert_hf_vit(sd: dict) -> dict:
    """Hugging Face ViT/DeiT names (the Hub's files and transformers >= 5's modules) -> timm names; query / key /
    value (q_proj / k_proj / v_proj) are concatenated (q; k; v) into qkv."""
    out, qkv = {}, {}
    for key, value in sd.items():
        k = re.sub(r"^(vit|deit)\.", "", key)
        if k.startswith("pooler."):
            continue  # HF's pooler is not part of ViT/DeiT classification
        m = _HF_QKV.match(k)
        if m:
            layer, part = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), _HF_QKV_PART[m.group(4)])
            qkv.setdefault((layer, m.group(5)), {})[part] = value
            continue
        out[rename_key(k, _HF_RULES)] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"Hugging Face checkpoint layer {layer}: incomplete q/k/v {kind} ({sorted(parts)})")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def _is_hf(sd: Mapping) -> bool:
    return any(k.startswith(("vit.embeddings.", "deit.embeddings.", "embeddings.patch_embeddings")) for k in sd)


def resample_pos_embed(pos_embed: Tensor, new_grid: tuple, num_prefix: int) -> Tensor:
    """(1, P + h*w, C) -> (1, P + H*W, C): bicubic over the patch grid, prefix slots kept as they are."""
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(math.sqrt(grid.shape[1]))
    if old * old != grid.shape[1]:
        raise CheckpointError(f"pos_embed has {grid.shape[1]} patch positions, not a square grid")
    C = grid.shape[-1]
    grid = grid.reshape(1, old, old, C).permute(0, 3, 1, 2).float()  # (1, C, h, w)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], C).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def filter_state_dict(sd: Mapping, model: nn.Module, report: Optional[LoadReport] = None) -> dict:
    """Convert a checkpoint's keys and shapes to those of `model` where a known conversion exists."""
    report = report if report is not None else LoadReport()
    sd = unwrap_state_dict(sd)
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            report.converted.append(f"stripped prefix {prefix!r}")
    if _is_hf(sd):
        sd = convert_hf_vit(sd)
        report.converted.append("Hugging Face ViT/DeiT names -> timm names")
    custom = getattr(model, "checkpoint_filter", None)  # a backbone's own layout conversion (timm's -> official)
    if callable(custom):
        sd = custom(sd)
    target = model.state_dict()
    pos = sd.get("pos_embed")
    if pos is not None and "pos_embed" in target and pos.shape != target["pos_embed"].shape:
        num_prefix = getattr(model, "num_prefix_tokens", 1)
        if pos.ndim == 3 and pos.shape[-1] == target["pos_embed"].shape[-1]:
            sd["pos_embed"] = resample_pos_embed(pos, model.grid_size, num_prefix)
            report.converted.append(f"pos_embed resampled {tuple(pos.shape)} -> {tuple(sd['pos_embed'].shape)}")
    return sd


CLASSIFIER_KEYS = ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight")


def num_classes_of(state_dict: Mapping) -> Optional[int]:
    """The number of classes of a (filtered) state dict: rows of its classifier weight, or None."""
    for key in CLASSIFIER_KEYS:
        w = state_dict.get(key)
        if isinstance(w, Tensor) and w.ndim >= 1:
            return int(w.shape[0])
    return None


def _fmt(keys: list, limit: int = 12) -> str:
    shown = ", ".join(str(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict(model: nn.Module, state_dict: Mapping, strict: bool = True,
                    source: str = "state dict") -> LoadReport:
    """Load an in-memory state dict through the same filter and checks as `load_checkpoint`."""
    report = LoadReport()
    sd = filter_state_dict(state_dict, model, report)
    target = model.state_dict()
    report.missing = [k for k in target if k not in sd]
    report.unexpected = [k for k in sd if k not in target]
    report.mismatched = [(k, tuple(sd[k].shape), tuple(target[k].shape)) for k in sd
                         if k in target and sd[k].shape != target[k].shape]
    if strict and not report.ok:
        name = getattr(model, "model_name", type(model).__name__)
        lines = [f"checkpoint {source} does not fit model {name!r}:"]
        if report.mismatched:
            lines.append("  shape mismatches (key: checkpoint vs model): "
                         + _fmt([f"{k}: {a} vs {b}" for k, a, b in report.mismatched]))
        if report.missing:
            lines.append(f"  missing keys ({len(report.missing)}): {_fmt(report.missing)}")
        if report.unexpected:
            lines.append(f"  unexpected keys ({len(report.unexpected)}): {_fmt(report.unexpected)}")
        n_ckpt, n_model = num_classes_of(sd), num_classes_of(target)
        if n_ckpt is not None and n_model is not None and n_ckpt != n_model:
            lines.append(f"  (the checkpoint has {n_ckpt} classes, the model {n_model}: build the model with "
                         f"num_classes={n_ckpt}, on the command line --num-classes {n_ckpt})")
        else:
            lines.append("  (is it for another architecture or method? load_checkpoint(..., strict=False) loads "
                         "what fits)")
        raise CheckpointError("\n".join(lines))
    bad = {k for k, _, _ in report.mismatched}
    fitting = {k: v for k, v in sd.items() if k in target and k not in bad}
    with torch.no_grad():
        for k, v in fitting.items():
            target[k].copy_(v.to(target[k].dtype))
    return report


def load_checkpoint(model: nn.Module, path: PathLike, strict: bool = True) -> LoadReport:
    """Load weights from `.safetensors` or `.pth` / `.pth.tar` into `model` (in place).

    Args:
        model: the model (with its method attached, if the checkpoint has the method's parameters).
        path: the file. `.pth` files are read with `torch.load(weights_only=True)` only.
        strict: raise a CheckpointError listing missing / unexpected / mismatched keys unless all fit.
    """
    return load_state_dict(model, read_checkpoint(path), strict=strict, source=repr(str(path)))


def save_checkpoint(model_or_state: Union[nn.Module, Mapping], path: PathLike,
                    metadata: Optional[dict] = None) -> Path:
    """Write weights as safetensors, atomically (temporary file, then rename). Returns the path."""
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp made it 0600: give it the mode open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
