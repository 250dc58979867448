"""DiT (Ma, Fei, Huang 2023): dynamic token routing on a PVTv2 grid, reconstructed as documented in docs/dit.md.

At node (s, j) = block j of scale s, a per-token gate on norm1(x) gives two straight-through hard decisions:
`transform` (run the block on this token, else identity) and `stay` (remain at scale s for node j+1, else move
down: early exit of the scale; at the last scale, early stop of feature extraction). With every gate open the
model is its dense twin `pvt_v2_*` (same keys plus `gates.*`). Training runs each block densely and masks it
(closed gates still get gradients); inference gathers the active tokens, runs the block on them with keys /
values from the full pre-block map (exact for any subset), scatters back, and skips nodes with no active token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..recipes import Recipe
from ..registry import FamilySpec, register_model_family
from ..tokens import ReductionInfo, gather_tokens
from .pvt_v2 import PvtBlock, PyramidVisionTransformerV2, Size, register_family, to_map, to_tokens


def hard_gate(logits: Tensor, training: bool) -> Tensor:
    """Straight-through gate: forward 1[logit > 0]; in training, backward through sigmoid(logit)."""
    hard = (logits > 0).to(logits.dtype)
    if not training:
        return hard
    soft = torch.sigmoid(logits)
    return hard + soft - soft.detach()


def dwconv_at(h: Tensor, index: Tensor, size: Size, conv: nn.Conv2d) -> Tensor:
    """Depth-wise 3x3 conv of a map that is h (B, k, Ch) at `index` (B, k) and 0 elsewhere, read at `index`.

    The conv runs over the whole map (9 Ch MACs per position: a per-node fixed cost, docs/dit.md section 4).
    """
    B, k, Ch = h.shape
    full = h.new_zeros(B, size[0] * size[1], Ch)
    full.scatter_(1, index.unsqueeze(-1).expand(-1, -1, Ch), h)
    return gather_tokens(to_tokens(conv(to_map(full, size))), index)


def block_masked(blk: PvtBlock, x: Tensor, xn: Tensor, size: Size, m: Optional[Tensor] = None) -> Tensor:
    """docs/dit.md section 4 on the whole map: x (B, N, C), xn = norm1(x), m (B, N, 1) gate (None = all open)."""
    a = blk.drop_path(blk.attn(xn, size))
    y = x + (a if m is None else m * a)
    h = blk.mlp.fc1(blk.norm2(y))
    h = h if m is None else h * m  # hidden is 0 at inactive positions
    h = blk.mlp.fc2(blk.mlp.act(to_tokens(blk.mlp.dwconv(to_map(h, size)))))
    h = blk.drop_path(h)
    return y + (h if m is None else m * h)


def block_subset(blk: PvtBlock, x: Tensor, xn: Tensor, size: Size, index: Tensor, valid: Tensor) -> Tensor:
    """The same block run only on tokens `index` (B, k) (valid (B, k, 1): padding slots False); scatter back."""
    xq = gather_tokens(x, index)  # (B, k, C)
    y = xq + blk.attn(xn, size, query=gather_tokens(xn, index))  # keys / values from the full map
    h = blk.mlp.fc1(blk.norm2(y)) * valid
    h = blk.mlp.fc2(blk.mlp.act(dwconv_at(h, index, size, blk.mlp.dwconv)))
    y = torch.where(valid, y + h, xq)
    return x.scatter(1, index.unsqueeze(-1).expand_as(y), y)


@dataclass
class NodeCost:
    """GMACs of one node for one image (docs/dit.md section 5)."""

    gate: float  # gate Linear(C, 2) over the map
    fixed: float  # SR conv + kv projection + depth-wise conv over the map, once if any token runs the block
    token: float  # per active token: q, attention, proj, fc1, fc2


def node_cost(dim: int, hidden: int, size: Size, sr: int) -> NodeCost:
    N, C = size[0] * size[1], dim
    M = (size[0] // sr) * (size[1] // sr) if sr > 1 else N
    fixed = (M * C * C * sr * sr if sr > 1 else 0) + 2 * M * C * C + 9 * N * hidden
    token = 2 * C * C + 2 * M * C + 2 * C * hidden
    return NodeCost(2 * N * C / 1e9, fixed / 1e9, token / 1e9)


def scale_sizes(img_hw: Size) -> list:
    """(H_s, W_s) of the four maps: conv 7x7 s4 p3, then conv 3x3 s2 p1."""
    h, w = (img_hw[0] - 1) // 4 + 1, (img_hw[1] - 1) // 4 + 1
    sizes = [(h, w)]
    for _ in range(3):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        sizes.append((h, w))
    return sizes


def budget_loss(gmacs: Tensor, gmacs_full: float, budget: float, weight: float = 1.0) -> Tensor:
    """w * (mean_b GMACs_b / GMACs_full - budget)^2 (docs/dit.md section 3); gmacs (B,) from info.extra."""
    return weight * (gmacs.mean() / gmacs_full - budget) ** 2


def check_budget(budget) -> float:
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ConfigError(f"budget must be a number in (0, 1], got {budget!r}") from None
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"budget must be a fraction of the full cost in (0, 1], got {budget!r}")
    return value


class DiT(PyramidVisionTransformerV2):
    """PVTv2 with per-token routing gates at every block (docs/dit.md).

    Args:
        budget: target fraction of the dense twin's GMACs (read by the budget loss), in (0, 1].
        gate_bias: initial bias of both gate logits (> 0: start with every gate open, i.e. the dense twin).
        **kwargs: PVTv2 architecture (depths, embed_dims, ..., num_classes, img_size).
    """

    family = "dit"

    def __init__(self, budget: float = 0.85, gate_bias: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.budget = check_budget(budget)
        self.nodes = [(s, j) for s in range(4) for j in range(self.depths[s])]
        self.node_names = [f"s{s}.b{j}" for s, j in self.nodes]
        self.gates = nn.ModuleList(nn.Linear(self.embed_dims[s], 2) for s, _ in self.nodes)
        for g in self.gates:
            nn.init.trunc_normal_(g.weight, std=0.02)
            nn.init.constant_(g.bias, gate_bias)
        self.gate_override: dict[int, str] = {}

    # ------------------------------------------------------------------ configuration
    def force_gates(self, mode: Optional[str], nodes: Optional[Sequence[Union[int, str]]] = None) -> None:
        """Force nodes 'open' (every token at the scale runs the block), 'closed' (node skipped) or None (learned).

        nodes: indices or names ('s0.b1'); None = every node. A forced node does not evaluate its gate.
        """
        if mode not in ("open", "closed", None):
            raise ConfigError(f"gate mode must be 'open', 'closed' or None, got {mode!r}")
        chosen = range(len(self.nodes)) if nodes is None else [self._node_index(n) for n in nodes]
        for n in chosen:
            if mode is None:
                self.gate_override.pop(n, None)
            else:
                self.gate_override[n] = mode

    def _node_index(self, node: Union[int, str]) -> int:
        if isinstance(node, str) and node in self.node_names:
            return self.node_names.index(node)
        if isinstance(node, int) and 0 <= node < len(self.nodes):
            return node
        raise ConfigError(f"unknown node {node!r}; nodes are 0..{len(self.nodes) - 1} or {self.node_names}")

    def node_costs(self, img_hw: Size) -> list:
        sizes = scale_sizes(img_hw)
        return [node_cost(self.embed_dims[s], int(self.embed_dims[s] * self.mlp_ratios[s]), sizes[s],
                          self.sr_ratios[s]) for s, _ in self.nodes]

    def base_gmacs(self, img_hw: Size) -> float:
        """Patch embeddings and head: spent by every image."""
        sizes, dims = scale_sizes(img_hw), self.embed_dims
        macs = sizes[0][0] * sizes[0][1] * dims[0] * self.in_chans * 49
        macs += sum(sizes[s][0] * sizes[s][1] * dims[s] * dims[s - 1] * 9 for s in range(1, 4))
        macs += dims[3] * self.num_classes if self.num_classes > 0 else 0
        return macs / 1e9

    def full_gmacs(self, img_hw: Optional[Size] = None) -> float:
        """GMACs of the dense twin (every gate open, no gate evaluated): the budget's denominator."""
        img_hw = img_hw or (self.img_size, self.img_size)
        sizes = scale_sizes(img_hw)
        nodes = sum(c.fixed + sizes[s][0] * sizes[s][1] * c.token
                    for c, (s, _) in zip(self.node_costs(img_hw), self.nodes))
        return self.base_gmacs(img_hw) + nodes

    # ------------------------------------------------------------------ forward
    def _run_scale(self, s: int, x: Tensor, size: Size, costs: list, acc: dict, rec: Optional[dict]) -> Tensor:
        """Route the tokens of scale s through its nodes; adds per-image GMACs to acc['gmacs'] (B,)."""
        B, N, _ = x.shape
        at = x.new_ones(B, N)  # still at this scale (straight-through float in training)
        first = self.node_names.index(f"s{s}.b0")
        depth = self.depths[s]
        for j, blk in enumerate(self.stages[s].blocks):
            n, c, mode = first + j, costs[first + j], self.gate_override.get(first + j)
            at_in = at
            if mode == "closed" or (mode is None and not self.training and not bool(at.any())):
                d = torch.zeros_like(at)  # early stop: nothing computed at this node
            else:
                xn = blk.norm1(x)
                if mode == "open":
                    t = stay = torch.ones_like(at)
                else:
                    logits = self.gates[n](xn.detach())  # routing does not reshape the features
                    t, stay = hard_gate(logits, self.training).unbind(-1)  # (B, N) each
                    acc["gmacs"] = acc["gmacs"] + c.gate * at.amax(1)
                    acc["executed"] += B * c.gate
                d = at * t
                x = self._run_block(blk, x, xn, size, d, c, acc)
                if j < depth - 1:
                    at = at * stay
            if rec is not None:
                rec["active"].append(d.detach() > 0)
                rec["at_scale"].append(at_in.detach() > 0)
        return x

    def _run_block(self, blk: PvtBlock, x: Tensor, xn: Tensor, size: Size, d: Tensor, c: NodeCost,
                   acc: dict) -> Tensor:
        B, N = d.shape
        if self.training:  # dense and masked: closed gates still get a gradient
            acc["gmacs"] = acc["gmacs"] + c.fixed * d.amax(1) + c.token * d.sum(1)
            acc["executed"] += B * (c.fixed + N * c.token)
            return block_masked(blk, x, xn, size, d.unsqueeze(-1))
        active = d > 0
        counts = active.sum(1)  # (B,)
        k = int(counts.max())
        acc["gmacs"] = acc["gmacs"] + c.fixed * (counts > 0) + c.token * counts
        if k == 0:
            return x  # node skipped: no token of the batch runs it
        acc["executed"] += B * (c.fixed + k * c.token)
        if bool((counts == N).all()):
            return block_masked(blk, x, xn, size)
        index = torch.argsort((~active).to(torch.int32), dim=1, stable=True)[:, :k]  # active first, in order
        valid = (torch.arange(k, device=x.device) < counts.unsqueeze(1)).unsqueeze(-1)  # (B, k, 1)
        return block_subset(blk, x, xn, size, index, valid)

    def forward_routed(self, x: Tensor, track: bool = False):
        """(four maps, ReductionInfo or None); the info always carries extra['gmacs'] when track is set."""
        img_hw = (x.shape[2], x.shape[3])
        costs = self.node_costs(img_hw)
        acc = {"gmacs": x.new_full((x.shape[0],), self.base_gmacs(img_hw)), "executed": 0.0}
        acc["executed"] = x.shape[0] * self.base_gmacs(img_hw)
        rec = {"active": [], "at_scale": []} if track else None
        maps, tokens, size, sizes = [], None, None, []
        for s, stage in enumerate(self.stages):
            tokens, size = self.embed(x, s, tokens, size)
            sizes.append(size)
            tokens = self._run_scale(s, tokens, size, costs, acc, rec)
            tokens = stage.norm(tokens)
            maps.append(to_map(tokens, size))
        info = self._build_info(rec, sizes, acc, img_hw) if track else None
        return maps, info

    def _build_info(self, rec: dict, sizes: list, acc: dict, img_hw: Size) -> ReductionInfo:
        info = ReductionInfo()
        finest = sizes[0]
        for (s, _), active in zip(self.nodes, rec["active"]):
            B = active.shape[0]
            ys = (torch.arange(finest[0], device=active.device) >> s).clamp(max=sizes[s][0] - 1)
            xs = (torch.arange(finest[1], device=active.device) >> s).clamp(max=sizes[s][1] - 1)
            owner = (ys[:, None] * sizes[s][1] + xs[None, :]).reshape(-1)  # (N0,) scale-s token of each patch
            kept = active[:, owner]  # (B, N0)
            info.patch_to_token.append(torch.where(kept, owner.expand(B, -1), torch.full_like(kept, -1, dtype=torch.long)))
            info.token_counts.append(int(active.sum(1).max()))
            per_token = torch.bincount(owner, minlength=active.shape[1]).float()
            info.sizes.append(per_token.expand(B, -1))
        at_by_scale = [[] for _ in range(4)]
        for (s, _), at in zip(self.nodes, rec["at_scale"]):
            at_by_scale[s].append(at.long())
        info.extra.update(
            nodes=list(self.node_names), active=rec["active"], at_scale=rec["at_scale"],
            exit_depth=[torch.stack(a, 0).sum(0) for a in at_by_scale],
            gmacs=acc["gmacs"], gmacs_full=self.full_gmacs(img_hw), executed_gmacs=acc["executed"],
            budget=self.budget)
        return info

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Four maps (B, C_s, H_s, W_s), skipped tokens at their identity value (docs/dit.md section 6)."""
        return self.forward_routed(x)[0]

    def forward(self, x: Tensor, return_info: bool = False):
        """Logits (B, classes); with return_info, (logits, ReductionInfo) with extra['gmacs'] (B,) etc."""
        maps, info = self.forward_routed(x, track=return_info)
        logits = self.forward_head(maps[-1])
        return (logits, info) if return_info else logits

    def extra_repr(self) -> str:
        forced = {self.node_names[n]: m for n, m in sorted(self.gate_override.items())}
        return f"budget={self.budget}" + (f", forced={forced}" if forced else "")

    # ------------------------------------------------------------------ what generic code asks (docs/dit.md 6)
    def info_lines(self, info: ReductionInfo) -> list:
        """Lines `dynavit info` prints about a routed forward (the model-family protocol)."""
        gmacs = info.extra["gmacs"]
        return [f"routing:    {float(gmacs.mean()):.4f} GMACs per image routed (budget {self.budget:g} of "
                f"{info.extra['gmacs_full']:.4f}); per image {[round(float(g), 4) for g in gmacs]}"]

    def viz_panels(self, info: ReductionInfo, b: int, image) -> list:
        """The panels `dynavit viz` draws for image b: blocks run per finest-scale location, as a heat map."""
        runs = torch.stack([(p2t[b] >= 0).float() for p2t in info.patch_to_token], 0).sum(0)  # (N0,)
        h, w = scale_sizes((self.img_size, self.img_size))[0]
        title = f"DiT: blocks run, {float(info.extra['gmacs'][b]):.3f} GMACs"
        return [(title, "heatmap", (image, runs.view(h, w), len(info.patch_to_token)))]


register_family("dit", DiT)


# ---------------------------------------------------------------------------------------------- the family spec
def _dit_model_for(name: str) -> str:
    """`--model` -> the DiT it names: a DiT itself, or the DiT twin of a PVTv2 (pvt_v2_bX -> dit_bX)."""
    if name.startswith("dit_"):
        return name
    if name.startswith("pvt_v2_"):
        return "dit_" + name[len("pvt_v2_"):]
    raise ConfigError(f"a DiT SPEC needs a DiT or PVTv2 model (e.g. --model dit_b0 or pvt_v2_b0, compared with its "
                      f"dense PVTv2 twin), got --model {name!r}")


def _dit_criterion(model: nn.Module, smoothing: float = 0.0, distill: bool = False) -> nn.Module:
    from ..losses_dit import dit_criterion  # losses_dit imports this module (budget_loss, check_budget)

    return dit_criterion(model, smoothing=smoothing)


RECIPE = Recipe("dit", "DiT (docs/dit.md): DeiT schedule, budget loss switched on after 40% of training",
                epochs=300, lr=5e-4, lr_batch=512, min_lr=1e-5, warmup_epochs=5, weight_decay=0.05,
                find_unused_parameters=True)

register_model_family(FamilySpec(
    "dit", params=("budget", "gate_bias"), primary="budget", recipe=RECIPE, criterion=_dit_criterion,
    doc="DiT: per-token routing gates on a PVTv2 (a model family: `dit:B` builds the DiT twin at budget B)",
    info_fields={"gmacs": "(B,) GMACs each image's routing spent", "gmacs_full": "GMACs of the dense twin",
                 "executed_gmacs": "GMACs the batch really executed", "budget": "the model's target fraction",
                 "nodes": "node names s{scale}.b{block}", "active": "per node, (B, N_s) tokens that ran the block",
                 "at_scale": "per node, (B, N_s) tokens still at that scale",
                 "exit_depth": "per scale, (B, N_s) blocks each token stayed for"},
    owns=lambda name: name.startswith("dit_"), model_for=_dit_model_for,
    dense_for=lambda name: "pvt_v2_" + name[len("dit_"):] if name.startswith("dit_") else name))
