"""DiT (Ma, Fei, Huang 2023): dynamic token routing in a multi-scale grid, reconstructed as documented in docs/dit.md.

The routing space is the paper's Fig. 2 grid: nodes F[i, j] at scale i (1/4, 1/8, 1/16, 1/32) and column j
(0..L, L = the PVTv2 variant's total depth). Each node sums what reaches it from its left (block B[i, j-1] or the
identity, per token) and from above (patch embedding P[i-1, j] of the finer scale). At every node a per-token gate
makes two straight-through hard decisions: `transform` (run B[i, j] on this token, else the identity) and
`scale` (send this token down: its 2x2 region becomes a token of scale i+1 at column j). A token that is neither
transformed nor sent is finished (early stop): it keeps its value in its scale's map and is not computed again.
PVTv2's staircase is one route of the grid (`force_gates("pvt_v2")`, and the gates' initial state); the blocks
on that route carry PVTv2's keys, so a PVTv2 checkpoint loads into DiT (`dynavit.load_checkpoint(dit, path,
strict=False)`), which also initialises every other block of a scale from PVTv2's blocks of that scale.
Training runs every node densely and masks it (closed gates get gradients); inference gathers the tokens a node
computes, runs them, scatters them back, and skips a node with no such token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..recipes import Recipe
from ..registry import FamilySpec, register_model_family
from ..tokens import ReductionInfo, gather_tokens
from ..viz import mask_tile, new_figure, save_figure, to_uint8_image
from .pvt_v2 import OverlapPatchEmbed, PvtBlock, PyramidVisionTransformerV2, Size, register_family, to_map, to_tokens

# 10.3 / 11.72: the abstract's DiT-B5 GFLOPs over PVTv2-B5's (docs/methods.md section 7); no other DiT variant
# is published
DEFAULT_BUDGET = 0.88
GATE_MODES = ("pvt_v2", "open", "closed", None)
# a patch embedding evaluated at a subset gathers 9 rows per next-scale token: above this fraction of the next map
# (for the batch's busiest image) a batch runs the whole-map convolution, faster (docs/dit.md section 8, measured at
# batch 128); one image always gathers, so that it executes exactly the GMACs it counts
DOWN_GATHER_MAX = 0.4
# a block that runs tokens of at most this fraction of a batch's images runs on those images only (their maps
# gathered): the others would pay its per-map work (SR conv, keys and values, depth-wise conv) for nothing
IMAGE_GATHER_MAX = 0.5


def hard_gate(logits: Tensor, training: bool) -> Tensor:
    """Straight-through gate: forward 1[logit > 0]; in training, backward through sigmoid(logit)."""
    hard = (logits > 0).to(logits.dtype)
    if not training:
        return hard
    soft = torch.sigmoid(logits)
    return hard + soft - soft.detach()


def active_index(mask: Tensor):
    """mask (B, N) bool -> (index (B, k) active positions first, in order, then inactive ones as padding;
    valid (B, k, 1); counts (B,)), k = the largest count. A stable partition by cumulative sums (no sort)."""
    B, N = mask.shape
    counts = mask.sum(1)
    k = int(counts.max())
    on = mask.long()
    slot = torch.where(mask, on.cumsum(1) - 1, counts.unsqueeze(1) + (1 - on).cumsum(1) - 1)  # (B, N) permutation
    order = torch.empty_like(slot).scatter_(1, slot, torch.arange(N, device=mask.device).expand(B, N))
    valid = (torch.arange(k, device=mask.device) < counts.unsqueeze(1)).unsqueeze(-1)
    return order[:, :k], valid, counts


def region_any(mask: Tensor, size: Size) -> Tensor:
    """(B, N) mask of a scale -> (B, N') over the next scale: 1 where any token of the 2x2 region is 1."""
    m = mask.view(mask.shape[0], 1, size[0], size[1])
    out = F.max_pool2d(m if m.is_floating_point() else m.to(torch.uint8), 2, 2, ceil_mode=True)
    return out.flatten(1) if mask.is_floating_point() else out.flatten(1).bool()


def kv_cells(reached: Tensor, size: Size, sr: int) -> Optional[Tensor]:
    """Keys to attend to: the SR-reduced cells (B, M) holding at least one reached token; None when all are."""
    if bool(reached.all()):
        return None
    m = reached
    if sr > 1:
        m = F.max_pool2d(reached.view(-1, 1, *size).to(torch.uint8), sr, sr).flatten(1).bool()
    return m | ~m.any(1, keepdim=True)  # an image with no reached token: any keys (its queries are padding)


def block_masked(blk: PvtBlock, x: Tensor, xn: Tensor, size: Size, m: Optional[Tensor] = None,
                 kv_mask: Optional[Tensor] = None) -> Tensor:
    """docs/dit.md section 4 on the whole map: x (B, N, C), xn = norm1(x), m (B, N, 1) gate (None = all run)."""
    a = blk.drop_path(blk.attn(xn, size, kv_mask=kv_mask))
    y = x + (a if m is None else m * a)
    h = blk.mlp.fc1(blk.norm2(y))
    h = h if m is None else h * m  # hidden is 0 at positions that do not run the block
    h = blk.mlp.fc2(blk.mlp.act(to_tokens(blk.mlp.dwconv(to_map(h, size)))))
    h = blk.drop_path(h)
    return y + (h if m is None else m * h)


def block_subset(blk: PvtBlock, x: Tensor, xn: Tensor, size: Size, index: Tensor, valid: Tensor,
                 kv_mask: Optional[Tensor] = None) -> Tensor:
    """The same block run only on tokens `index` (B, k) (valid (B, k, 1): padding slots False); scatter back.

    The attention runs on the (B, k) padded queries; the MLP (fc1, fc2: most of a token's MACs at PVTv2's MLP
    ratio 8) on the valid tokens of the whole batch packed into one list, so a batch pays for the tokens its
    images route there, not k per image.
    """
    B, k = index.shape
    N, C = x.shape[1], x.shape[2]
    y = gather_tokens(x, index) + blk.attn(xn, size, query=gather_tokens(xn, index), kv_mask=kv_mask)  # (B, k, C)
    packed = valid.reshape(-1).nonzero().squeeze(1)  # (n,) valid slots of (B k)
    rows = (index + torch.arange(B, device=x.device).unsqueeze(1) * N).reshape(-1).index_select(0, packed)
    y = y.reshape(B * k, C).index_select(0, packed)  # (n, C)
    h = blk.mlp.fc1(blk.norm2(y))  # (n, hidden)
    full = h.new_zeros(B * N, h.shape[1]).index_copy_(0, rows, h)  # the map, 0 where no token runs
    h = to_tokens(blk.mlp.dwconv(to_map(full.view(B, N, -1), size))).reshape(B * N, -1).index_select(0, rows)
    y = y + blk.mlp.fc2(blk.mlp.act(h))
    return x.reshape(B * N, C).index_copy(0, rows, y).view(B, N, C)


def window_positions(index: Tensor, size: Size):
    """The 3x3 windows of a stride-2, padding-1 patch embedding at next-scale tokens `index` (B, k) on a map of
    `size`: (positions (B, 9 k) into the fine map's tokens, clamped; in_bounds (B, 9 k)), in (dy, dx) order."""
    H, W = size
    B, k = index.shape
    Wn = (W - 1) // 2 + 1
    offsets = torch.arange(-1, 2, device=index.device)
    ys = (2 * torch.div(index, Wn, rounding_mode="floor")).unsqueeze(-1) + offsets  # (B, k, 3)
    xs = (2 * (index % Wn)).unsqueeze(-1) + offsets
    in_bounds = ((ys >= 0) & (ys < H)).unsqueeze(-1) & ((xs >= 0) & (xs < W)).unsqueeze(-2)  # (B, k, 3, 3)
    pos = ys.clamp(0, H - 1).unsqueeze(-1) * W + xs.clamp(0, W - 1).unsqueeze(-2)
    return pos.view(B, 9 * k), in_bounds.view(B, 9 * k)


def down_tokens_subset(down: OverlapPatchEmbed, norm: nn.Module, x: Tensor, size: Size, index: Tensor,
                       sent: Optional[Tensor] = None) -> Tensor:
    """The stride-2 patch embedding of norm(x) (x (B, N, C) tokens of a map of `size`, zero where `sent` (B, N) is
    False) evaluated only at next-scale tokens `index` (B, k): (B, k, C').

    The 3x3 windows are gathered from the token list (9 rows per token, no padded copy or im2col of the map), then
    one matmul (9 C C' MACs per token) and the LayerNorm. `norm` is per token, so it runs on the gathered rows when
    they are fewer than the map's.
    """
    conv = down.proj
    B, N, C = x.shape
    k = index.shape[1]
    pos, ok = window_positions(index, size)  # (B, 9k)
    if sent is not None:
        ok = ok & sent.gather(1, pos)
    rows = norm(gather_tokens(x, pos)) if 9 * k < N else gather_tokens(norm(x), pos)  # (B, 9k, C)
    cols = (rows * ok.unsqueeze(-1).to(rows.dtype)).view(B, k, 9 * C)  # (dy, dx, c)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], 9 * C)  # the same (dy, dx, c) order
    return down.norm(F.linear(cols, weight, conv.bias))


def down_subset(down: OverlapPatchEmbed, fine: Tensor, index: Tensor) -> Tensor:
    """The stride-2 patch embedding of map `fine` (B, C, H, W) evaluated only at next-scale tokens `index` (B, k)."""
    return down_tokens_subset(down, nn.Identity(), to_tokens(fine), fine.shape[2:], index)


@dataclass
class GridState:
    """The four scales' maps after the last column (a forward's result, before norms and head)."""

    tokens: list  # per scale (B, N_i, C_i), or None where no token of the batch arrived
    reached: list  # per scale (B, N_i) bool: positions some token arrived at (None with tokens None)
    sizes: list  # per scale (H_i, W_i)
    batch: int


@dataclass
class NodeCost:
    """GMACs of one node for one image (docs/dit.md section 5)."""

    gate: float  # per token the gate reads: Linear(C, 2)
    fixed: float  # SR conv + kv projection + depth-wise conv over the map, once if any token runs the block
    token: float  # per token that runs the block: q, attention, proj, fc1, fc2
    down: float  # per next-scale token made by this node's patch embedding: conv 3x3 C -> C'
    mlp: float = 0.0  # the fc1 + fc2 part of `token` (run packed over the batch by block_subset)


def block_cost(dim: int, hidden: int, size: Size, sr: int) -> tuple:
    """(fixed, per-token) MACs of a PVTv2 block on a map of `size` (docs/dit.md section 5)."""
    N, C = size[0] * size[1], dim
    M = (size[0] // sr) * (size[1] // sr) if sr > 1 else N
    fixed = (M * C * C * sr * sr if sr > 1 else 0) + 2 * M * C * C + 9 * N * hidden
    return fixed, 2 * C * C + 2 * M * C + 2 * C * hidden


def scale_sizes(img_hw: Size) -> list:
    """(H_s, W_s) of the four maps: conv 7x7 s4 p3, then conv 3x3 s2 p1."""
    h, w = (img_hw[0] - 1) // 4 + 1, (img_hw[1] - 1) // 4 + 1
    sizes = [(h, w)]
    for _ in range(3):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        sizes.append((h, w))
    return sizes


def budget_loss(gmacs: Tensor, gmacs_twin: float, budget: float, weight: float = 1.0) -> Tensor:
    """w * (mean_b GMACs_b / GMACs_twin - budget)^2 (docs/dit.md section 3); gmacs (B,) from info.extra."""
    return weight * (gmacs.mean() / gmacs_twin - budget) ** 2


def check_budget(budget) -> float:
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ConfigError(f"budget must be a number in (0, 1], got {budget!r}") from None
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"budget must be a fraction of the PVTv2 twin's cost in (0, 1], got {budget!r}")
    return value


def check_window(window) -> tuple:
    try:
        finer, coarser = (int(v) for v in window)
    except (TypeError, ValueError):
        raise ConfigError(f"window must be two integers (finer, coarser) in 0..3, got {window!r}") from None
    if not (0 <= finer <= 3 and 0 <= coarser <= 3):
        raise ConfigError(f"window must be two integers (finer, coarser) in 0..3, got {window!r}")
    return finer, coarser


class DiT(PyramidVisionTransformerV2):
    """The DiT routing grid over a PVTv2 variant (docs/dit.md).

    Args:
        budget: target GMACs as a fraction of the PVTv2 twin's (read by the budget loss), in (0, 1].
        gate_bias: |initial bias| of the gate logits; weights start at 0, so the initial gates route every token
            along PVTv2's staircase (+bias on that route, -bias elsewhere).
        window: (finer, coarser): the columns of PVTv2 stage k hold scales k - finer .. k + coarser (default
            (1, 1), the paper's visualisation; (3, 3) = every scale in every column).
        dense_above: inference cost model: a block whose running tokens exceed this fraction of the map (for some
            image of the batch) runs on the whole map and masks the result instead of gathering (same numbers;
            executed GMACs rise, wall-clock falls where gathering costs more than it saves). 1.0 = always gather.
        **kwargs: PVTv2 architecture (depths, embed_dims, ..., num_classes, img_size, global_pool).
    """

    family = "dit"

    def __init__(self, budget: float = DEFAULT_BUDGET, gate_bias: float = 2.0, window: Sequence[int] = (1, 1),
                 dense_above: float = 1.0, **kwargs):
        if kwargs.get("token_head_scale") is not None:
            raise ConfigError("token_head_scale (token labelling) is a PVTv2 training option; DiT does not take "
                              "it: train the PVTv2 twin with it, then start DiT from that checkpoint")
        super().__init__(**kwargs)
        self.budget = check_budget(budget)
        if not 0.0 <= float(dense_above) <= 1.0:
            raise ConfigError(f"dense_above must be a fraction in [0, 1], got {dense_above!r}")
        self.dense_above = float(dense_above)
        self.window = check_window(window)
        finer, coarser = self.window
        L = self.columns = sum(self.depths)
        self.stage_of = [s for s, d in enumerate(self.depths) for _ in range(d)]  # PVTv2 stage of column j
        self.starts = [sum(self.depths[:s]) for s in range(4)] + [L]
        # scale i runs blocks in the columns of stages i - coarser .. i + finer, and has nodes one column further
        self.block_span = [(self.starts[max(0, i - coarser)], self.starts[min(3, i + finer) + 1] - 1) for i in range(4)]
        self.nodes = [(i, j) for j in range(L + 1) for i in range(4) if self.has_block(i, j) or self.has_down(i, j)]
        self.node_names = [f"s{i}.c{j}" for i, j in self.nodes]
        self.node_index = {node: n for n, node in enumerate(self.nodes)}
        blk0 = [self.stages[i].blocks[0] for i in range(4)]
        dpr = torch.linspace(0, kwargs.get("drop_path_rate", 0.0), L).tolist()
        self.grid = nn.ModuleDict()  # blocks off PVTv2's route: "s{i}c{j}"
        self.grid_source = {}  # their initialisation: the PVTv2 block of the same scale (state-dict prefix)
        for i, j in self.nodes:
            if self.has_block(i, j) and self.stage_of[j] != i:
                a = blk0[i].attn
                self.grid[f"s{i}c{j}"] = PvtBlock(self.embed_dims[i], a.num_heads, self.mlp_ratios[i], a.sr_ratio,
                                                  a.q.bias is not None, dpr[j])
                src = 0 if j < self.starts[i] else self.depths[i] - 1  # first block before the stage, last after
                self.grid_source[f"s{i}c{j}"] = f"stages.{i}.blocks.{src}."
        with torch.no_grad():
            for name, prefix in self.grid_source.items():
                self.grid[name].load_state_dict(self.stages[int(prefix.split(".")[1])].blocks[int(prefix.split(".")[3])]
                                                .state_dict())
        self.gates = nn.ModuleList(nn.Linear(self.embed_dims[i], 2) for i, _ in self.nodes)
        with torch.no_grad():
            for n, gate in enumerate(self.gates):
                nn.init.zeros_(gate.weight)
                t, g = self.route_gates(n)
                gate.bias.copy_(torch.tensor([gate_bias if t else -gate_bias, gate_bias if g else -gate_bias]))
        self.gate_override: dict = {}
        # what a PVTv2 checkpoint cannot hold (`--init pvt_v2.pth` is DiT's fine-tune; the fresh gates route
        # every token along PVTv2's staircase), as a method's own tensors are for a dense model
        self.method_state_keys = tuple(f"gates.{n}.{w}" for n in range(len(self.gates)) for w in ("weight", "bias"))
        self._register_load_state_dict_pre_hook(self._fill_grid_hook)  # plain torch `load_state_dict` too

    # ------------------------------------------------------------------ the grid
    def has_block(self, i: int, j: int) -> bool:
        """Block B[i, j] (F[i, j] -> F[i, j+1]) exists."""
        return j < self.columns and self.block_span[i][0] <= j <= self.block_span[i][1]

    def has_node(self, i: int, j: int) -> bool:
        return self.block_span[i][0] <= j <= min(self.block_span[i][1] + 1, self.columns)

    def has_down(self, i: int, j: int) -> bool:
        """Patch embedding P[i, j] (F[i, j] -> F[i+1, j]) exists."""
        return i < 3 and self.has_node(i, j) and self.has_node(i + 1, j)

    def block(self, i: int, j: int) -> PvtBlock:
        if self.stage_of[j] == i:
            return self.stages[i].blocks[j - self.starts[i]]
        return self.grid[f"s{i}c{j}"]

    def route_gates(self, n: int, mode: str = "pvt_v2") -> tuple:
        """(transform, scale) of node n under a forced mode: PVTv2's staircase, all open, or closed."""
        i, j = self.nodes[n]
        if mode == "closed":
            return False, False
        if mode == "open":
            return self.has_block(i, j), self.has_down(i, j)
        return (self.has_block(i, j) and self.stage_of[j] == i), (self.has_down(i, j) and j == self.starts[i + 1])

    def checkpoint_filter(self, sd: dict, prefix: str = "") -> dict:
        """Called by `dynavit.load_checkpoint`: any released PVTv2 layout (PVTv2's own filter) is converted, then a
        PVTv2 state dict fills the off-route blocks from its own blocks."""
        sd = dict(super().checkpoint_filter(sd) if not prefix else sd)
        have = {k[len(prefix):].split(".")[1] for k in sd if k.startswith(prefix + "grid.")}
        for name, src in self.grid_source.items():
            if name not in have:
                src = prefix + src
                sd.update({f"{prefix}grid.{name}.{k[len(src):]}": v for k, v in sd.items() if k.startswith(src)})
        return sd

    def _fill_grid_hook(self, state_dict, prefix, *args) -> None:
        filled = self.checkpoint_filter(state_dict, prefix)
        state_dict.update({k: v for k, v in filled.items() if k not in state_dict})

    # ------------------------------------------------------------------ configuration
    def force_gates(self, mode: Optional[str], nodes: Optional[Sequence[Union[int, str]]] = None) -> None:
        """Force gates: 'pvt_v2' (every token on PVTv2's staircase), 'open' (the full routing space: every token
        transformed and sent down wherever the grid allows), 'closed' (the node computes nothing), None (learned).

        nodes: indices or names ('s1.c4'); None = every node. A forced node does not evaluate its gate.
        """
        if mode not in GATE_MODES:
            raise ConfigError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")
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
        raise ConfigError(f"unknown node {node!r}; nodes are 0..{len(self.nodes) - 1} or names like "
                          f"{self.node_names[:3]} (s = scale, c = column)")

    # ------------------------------------------------------------------ costs
    def node_costs(self, img_hw: Size) -> list:
        sizes, dims = scale_sizes(img_hw), self.embed_dims
        costs = []
        for i, j in self.nodes:
            fixed, token = block_cost(dims[i], int(dims[i] * self.mlp_ratios[i]), sizes[i], self.sr_ratios[i]) \
                if self.has_block(i, j) else (0, 0)
            down = 9 * dims[i] * dims[i + 1] if self.has_down(i, j) else 0
            mlp = 2 * dims[i] * int(dims[i] * self.mlp_ratios[i]) if self.has_block(i, j) else 0
            costs.append(NodeCost(2 * dims[i] / 1e9, fixed / 1e9, token / 1e9, down / 1e9, mlp / 1e9))
        return costs

    def base_gmacs(self, img_hw: Size) -> float:
        """Stem and head: spent by every image."""
        n0 = scale_sizes(img_hw)[0]
        macs = n0[0] * n0[1] * self.embed_dims[0] * self.in_chans * 49
        return (macs + (self.embed_dims[3] * self.num_classes if self.num_classes > 0 else 0)) / 1e9

    def _forced_gmacs(self, img_hw: Optional[Size], mode: str) -> float:
        img_hw = img_hw or (self.img_size, self.img_size)
        sizes = scale_sizes(img_hw)
        total = self.base_gmacs(img_hw)
        for n, (c, (i, _)) in enumerate(zip(self.node_costs(img_hw), self.nodes)):
            t, g = self.route_gates(n, mode)
            total += (c.fixed + sizes[i][0] * sizes[i][1] * c.token) * t
            total += sizes[i + 1][0] * sizes[i + 1][1] * c.down * g if i < 3 else 0
        return total

    def twin_gmacs(self, img_hw: Optional[Size] = None) -> float:
        """GMACs of the PVTv2 route (= the `pvt_v2` twin): the budget's denominator."""
        return self._forced_gmacs(img_hw, "pvt_v2")

    full_gmacs = twin_gmacs  # the name generic code and older scripts use for the budget's denominator

    def space_gmacs(self, img_hw: Optional[Size] = None) -> float:
        """GMACs of the full routing space (every gate forced open)."""
        return self._forced_gmacs(img_hw, "open")

    def budget_gmacs(self, img_hw: Optional[Size] = None) -> float:
        """The budget's target: budget x the PVTv2 twin's GMACs."""
        return self.budget * self.twin_gmacs(img_hw)

    def cost_summary(self, img_hw: Optional[Size] = None) -> dict:
        """GMACs of the full routing space, of the PVTv2 route (the twin) and of the budget's target."""
        return {"space": self.space_gmacs(img_hw), "twin": self.twin_gmacs(img_hw), "budget": self.budget,
                "budgeted": self.budget_gmacs(img_hw)}

    # ------------------------------------------------------------------ forward
    def _decide(self, n: int, xn: Tensor, a: Tensor, c: NodeCost, acc: dict):
        """(transform, scale) masks (B, N) of node n for the tokens alive there (a), from the normed node xn;
        counts the gate's cost."""
        mode = self.gate_override.get(n)
        B, N = a.shape
        if mode is not None:
            t, g = self.route_gates(n, mode)
            return a * t, a * g  # works for float and bool masks
        if self.training:
            t, g = hard_gate(self.gates[n](xn.detach()), True).unbind(-1)
            acc["gmacs"] = acc["gmacs"] + c.gate * a.sum(1)
            acc["executed"] += B * N * c.gate
            return a * t, a * g
        counts = a.sum(1)
        acc["gmacs"] = acc["gmacs"] + c.gate * counts
        if B > 1 or bool(a.all()) or int(counts.max()) > self.dense_above * N:
            # a batch reads every token's gate (2 C MACs each): cheaper than gathering the alive ones and
            # scattering the decisions back; one image gathers, so that it executes exactly what it counts
            acc["executed"] += B * N * c.gate
            hard = self.gates[n](xn) > 0  # (B, N, 2)
            return hard[..., 0] & a, hard[..., 1] & a
        index, valid, _ = active_index(a)
        hard = (self.gates[n](gather_tokens(xn, index)) > 0) & valid  # (1, k, 2)
        acc["executed"] += index.shape[1] * c.gate
        t = a.new_zeros(B, N).scatter(1, index, hard[..., 0])
        return t, a.new_zeros(B, N).scatter(1, index, hard[..., 1])

    def _down(self, i: int, x: Tensor, sent: Tensor, size: Size, c: NodeCost, acc: dict):
        """P[i, j]: the next scale's tokens made from the sent tokens; None if there are none."""
        if not self.training and not bool(sent.any()):
            return None
        r = region_any(sent, size)  # (B, N') next-scale tokens that receive
        acc["gmacs"] = acc["gmacs"] + c.down * r.sum(1)
        down = self.stages[i + 1].downsample
        dense_above = self.dense_above if r.shape[0] == 1 else min(self.dense_above, DOWN_GATHER_MAX)
        if self.training or bool(r.all()) or int(r.sum(1).max()) > dense_above * r.shape[1]:
            acc["executed"] += r.numel() * c.down
            fine = self.stages[i].norm(x)
            fine = fine if not self.training and bool(sent.all()) else fine * sent.unsqueeze(-1)
            return r, None, down(to_map(fine, size))[0]
        index, valid, _ = active_index(r)
        acc["executed"] += index.numel() * c.down
        return r, (index, valid), down_tokens_subset(down, self.stages[i].norm, x, size, index, sent)

    def _block(self, i: int, j: int, x: Tensor, xn: Tensor, run: Tensor, reached: Tensor, size: Size, c: NodeCost,
               acc: dict) -> Tensor:
        """B[i, j] on the tokens `run` (B, N) (xn = its norm1 of x); the others keep their value."""
        B, N = run.shape
        blk = self.block(i, j)
        if self.training:
            acc["gmacs"] = acc["gmacs"] + c.fixed * run.amax(1) + c.token * run.sum(1)
            acc["executed"] += B * (c.fixed + N * c.token)
            kv = kv_cells(reached, size, blk.attn.sr_ratio)
            xn = xn if kv is None else xn * reached.unsqueeze(-1)  # positions no token reached are empty
            return block_masked(blk, x, xn, size, run.unsqueeze(-1), kv)
        counts = run.sum(1)
        if int(counts.max()) == 0:
            return x  # nothing runs: the node is skipped
        acc["gmacs"] = acc["gmacs"] + c.fixed * (counts > 0) + c.token * counts
        busy = counts > 0
        if B > 1 and int(busy.sum()) <= IMAGE_GATHER_MAX * B:  # few images run here: only they pay the map's work
            images = busy.nonzero().squeeze(1)
            sub = [t.index_select(0, images) for t in (x, xn, run, reached, counts)]
            return x.index_copy(0, images, self._run_block(blk, *sub, size, c, acc))
        return self._run_block(blk, x, xn, run, reached, counts, size, c, acc)

    def _run_block(self, blk: PvtBlock, x: Tensor, xn: Tensor, run: Tensor, reached: Tensor, counts: Tensor,
                   size: Size, c: NodeCost, acc: dict) -> Tensor:
        """Inference: the block on the tokens `run` (B, N) of these images, gathered or on the whole map."""
        B, N = run.shape
        kv = kv_cells(reached, size, blk.attn.sr_ratio)
        xn = xn if kv is None else xn * reached.unsqueeze(-1)  # positions no token reached are empty
        if bool(run.all()):
            acc["executed"] += B * (c.fixed + N * c.token)
            return block_masked(blk, x, xn, size, None, kv)
        if int(counts.max()) > self.dense_above * N:  # cheaper on the whole map than gathered (docs/dit.md §8)
            acc["executed"] += B * (c.fixed + N * c.token)
            return block_masked(blk, x, xn, size, run.unsqueeze(-1).to(x.dtype), kv)
        index, valid, _ = active_index(run)
        acc["executed"] += B * (c.fixed + index.shape[1] * (c.token - c.mlp)) + int(counts.sum()) * c.mlp
        return block_subset(blk, x, xn, size, index, valid, kv)

    def forward_routed(self, x: Tensor, track: bool = False):
        """(GridState after the last column, ReductionInfo or None); the info carries extra['gmacs'] (B,) etc."""
        img_hw = (x.shape[2], x.shape[3])
        sizes, costs = scale_sizes(img_hw), self.node_costs(img_hw)
        tokens, _ = self.embed(x, 0, None, None)
        B, N0 = tokens.shape[:2]
        base = self.base_gmacs(img_hw)
        acc = {"gmacs": tokens.new_full((B,), base), "executed": B * base}
        X: list = [tokens, None, None, None]
        full = torch.ones(B, N0, dtype=torch.bool, device=x.device)
        alive: list = [tokens.new_ones(B, N0) if self.training else full, None, None, None]
        reached: list = [full, None, None, None]
        pending: list = [None] * 4
        rec = [] if track else None
        for j in range(self.columns + 1):
            for i in range(4):
                if pending[i] is not None:
                    self._receive(i, X, alive, reached, pending[i])
                    pending[i] = None
                n = self.node_index.get((i, j))
                if n is None:
                    continue
                if X[i] is None or (not self.training and not bool(alive[i].any())):
                    if rec is not None:  # early stop: nothing alive here, nothing computed
                        zeros = torch.zeros(B, sizes[i][0] * sizes[i][1], dtype=torch.bool, device=x.device)
                        rec.append((zeros, zeros, zeros))
                    if X[i] is not None:
                        alive[i] = alive[i] & False
                    continue
                c = costs[n]
                # the gate reads the node through its block's norm1 (needed for keys / values anyway); a node
                # without a block through a LayerNorm without affine parameters
                xn = self.block(i, j).norm1(X[i]) if self.has_block(i, j) else F.layer_norm(X[i], X[i].shape[-1:])
                run, sent = self._decide(n, xn, alive[i], c, acc)
                mode = self.gate_override.get(n)
                can_run, can_send = self.route_gates(n, mode) if mode is not None else (True, True)
                if self.has_down(i, j) and can_send and (self.training or bool(sent.any())):
                    pending[i + 1] = self._down(i, X[i], sent, sizes[i], c, acc)
                if self.has_block(i, j) and can_run:
                    X[i] = self._block(i, j, X[i], xn, run, reached[i], sizes[i], c, acc)
                else:
                    run = run * False
                if rec is not None:
                    rec.append((alive[i].detach() > 0, run.detach() > 0, sent.detach() > 0))
                alive[i] = run  # only transformed tokens go on along the row
        info = self._build_info(rec, sizes, acc, img_hw) if track else None
        return GridState(X, reached, sizes, B), info

    def _receive(self, i: int, X: list, alive: list, reached: list, pending) -> None:
        """Sum the patch-embedding path from above into F[i, j] and mark its tokens alive."""
        r, subset, D = pending
        if subset is not None:  # inference: D (B, k, C) at index
            index, valid = subset
            base = X[i] if X[i] is not None else D.new_zeros(D.shape[0], r.shape[1], D.shape[2])
            X[i] = base.scatter_add(1, index.unsqueeze(-1).expand_as(D), D * valid)
        elif self.training:
            X[i] = r.unsqueeze(-1) * D if X[i] is None else X[i] + r.unsqueeze(-1) * D
        else:
            D = D if bool(r.all()) else D * r.unsqueeze(-1)
            X[i] = D if X[i] is None else X[i] + D
        hard = r.detach() > 0
        reached[i] = hard if reached[i] is None else reached[i] | hard
        if alive[i] is None:
            alive[i] = r
        else:
            alive[i] = alive[i] + r - alive[i] * r if self.training else alive[i] | r

    def _build_info(self, rec: list, sizes: list, acc: dict, img_hw: Size) -> ReductionInfo:
        info = ReductionInfo()
        finest = sizes[0]
        B = rec[0][0].shape[0]
        scale_tokens = torch.zeros(B, self.columns, 4, dtype=torch.long, device=rec[0][0].device)
        for (i, j), (_, ran, _) in zip(self.nodes, rec):
            if j < self.columns:
                scale_tokens[:, j, i] = ran.sum(1)
            ys = (torch.arange(finest[0], device=ran.device) >> i).clamp(max=sizes[i][0] - 1)
            xs = (torch.arange(finest[1], device=ran.device) >> i).clamp(max=sizes[i][1] - 1)
            owner = (ys[:, None] * sizes[i][1] + xs[None, :]).reshape(-1)  # (N0,) scale-i token of each patch
            kept = ran[:, owner]  # (B, N0)
            info.patch_to_token.append(torch.where(kept, owner.expand(B, -1), torch.full_like(owner, -1)))
            info.token_counts.append(int(ran.sum(1).max()))
            info.sizes.append(torch.bincount(owner, minlength=ran.shape[1]).float().expand(B, -1))
        twin = self.twin_gmacs(img_hw)
        info.extra.update(
            nodes=list(self.node_names), alive=[r[0] for r in rec], ran=[r[1] for r in rec],
            sent=[r[2] for r in rec], scale_tokens=scale_tokens, scale_sizes=sizes, stage_of=list(self.stage_of),
            gmacs=acc["gmacs"], gmacs_twin=twin, gmacs_full=twin, gmacs_space=self.space_gmacs(img_hw),
            executed_gmacs=acc["executed"], budget=self.budget)
        return info

    def scale_maps(self, state: "GridState") -> list:
        """Four maps (B, C_i, H_i, W_i) after each scale's norm; positions no token reached are 0."""
        maps = []
        for i, (x, r, size) in enumerate(zip(state.tokens, state.reached, state.sizes)):
            if x is None:
                maps.append(self.head.weight.new_zeros(state.batch, self.embed_dims[i], *size))
                continue
            y = self.stages[i].norm(x)
            maps.append(to_map(y if bool(r.all()) else y * r.unsqueeze(-1), size))
        return maps

    def pool_logits(self, state: "GridState") -> Tensor:
        """The head on the 1/32 map, pooled over the positions tokens reached (all of them on PVTv2's route)."""
        x, r = state.tokens[3], state.reached[3]
        if x is None:  # no token of the batch reached 1/32
            pooled = self.head.weight.new_zeros(state.batch, self.embed_dims[3])
            return self.head(pooled)
        y = self.stages[3].norm(x)
        if bool(r.all()):
            return self.forward_head(to_map(y, state.sizes[3]))
        w = r.unsqueeze(-1).to(y.dtype)
        if self.global_pool == "avg":
            pooled = (y * w).sum(1) / w.sum(1).clamp(min=1)
        else:
            pooled = y.masked_fill(~r.unsqueeze(-1), float("-inf")).amax(1)
            pooled = torch.where(r.any(1, keepdim=True), pooled, torch.zeros_like(pooled))
        return self.head(pooled)

    def forward_features(self, x: Tensor) -> list:
        """Four maps (B, C_s, H_s, W_s), one per scale (docs/dit.md section 6): a token carries the value it had
        when it stopped at that scale; positions no token reached are 0. For detection / segmentation necks."""
        return self.scale_maps(self.forward_routed(x)[0])

    def forward(self, x: Tensor, return_info: bool = False):
        """Logits (B, classes); with return_info, (logits, ReductionInfo) with extra['gmacs'] (B,) etc."""
        state, info = self.forward_routed(x, track=return_info)
        logits = self.pool_logits(state)
        return (logits, info) if return_info else logits

    # ------------------------------------------------------------------ what generic code asks (docs/dit.md 6)
    def info_lines(self, info: ReductionInfo) -> list:
        """Lines `dynavit info` prints (the model-family protocol): the routing space's costs next to the budget,
        the GMACs of image 0's routing and its block runs per stage and stride."""
        c = self.cost_summary()
        lines = [f"routing:    full space {c['space']:.4g} GMACs | PVTv2 route (twin) {c['twin']:.4g} | "
                 f"budget {c['budget']:g} x twin = {c['budgeted']:.4g}",
                 f"            this model's gates on one random image: {float(info.extra['gmacs'][0]):.4g} GMACs"]
        st = info.extra["scale_tokens"][0]  # (columns, 4): tokens that ran a block
        for k in range(4):
            cols = [j for j, s in enumerate(self.stage_of) if s == k]
            lines.append(f"            stage {k + 1} ({len(cols)} columns), block runs per stride 4/8/16/32: "
                         + " / ".join(str(int(v)) for v in st[cols].sum(0)))
        return lines

    def viz_panels(self, info: ReductionInfo, b: int, image) -> list:
        """The panels `dynavit viz` draws for image b: blocks run per finest-scale location, as a heat map."""
        runs = torch.stack([(p2t[b] >= 0).float() for p2t in info.patch_to_token], 0).sum(0)  # (N0,)
        h, w = scale_sizes((self.img_size, self.img_size))[0]
        title = f"DiT: blocks run, {float(info.extra['gmacs'][b]):.3f} GMACs"
        return [(title, "heatmap", (image, runs.view(h, w), len(info.patch_to_token)))]

    def export_blocker(self) -> Optional[str]:
        """Why `dynavit export` refuses this model (the model-family protocol), or None when every gate is forced."""
        if len(self.gate_override) < len(self.nodes):
            return ("DiT routing runs a per-image set of tokens through each block (data-dependent shapes); run it "
                    "eagerly, or force every gate open / closed (model.force_gates('open')) to export a fixed path")
        return None

    def routing_rows(self, x: Tensor) -> list:
        """Per image: (uint8 image, tiles[stride row][stage col], token counts, GMACs, predicted class), the
        paper's visualisation drawn by `save_viz`."""
        self.eval()
        with torch.no_grad():
            logits, info = self(x, return_info=True)
        act, sizes = stage_activity(info), info.extra["scale_sizes"]
        out = []
        for b in range(x.shape[0]):
            image = to_uint8_image(x[b])
            tiles = [[mask_tile(image, act[i][k][b], sizes[i]) for k in range(4)] for i in range(4)]
            counts = [[int(act[i][k][b].sum()) for k in range(4)] for i in range(4)]
            out.append((image, tiles, counts, float(info.extra["gmacs"][b]), int(logits[b].argmax())))
        return out

    def save_viz(self, x: Tensor, path, labels: Optional[Sequence[str]] = None, title: Optional[str] = None):
        """The figure `dynavit viz` saves for a DiT (the model-family protocol): per image, the input and a 4 x 4
        grid (rows = strides 4, 8, 16, 32; columns = PVTv2 stages 1-4) of the tokens that ran a block there."""
        rows = self.routing_rows(x)
        fig, axes = new_figure(4 * len(rows), 5, (2.0 * 5, 2.0 * 4 * len(rows)))
        for b, (image, tiles, counts, gmacs, pred) in enumerate(rows):
            for i in range(4):
                for col in range(5):
                    ax = axes[4 * b + i][col]
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if col == 0:
                        if i == 0:
                            ax.imshow(image)
                            name = f" ({labels[b]})" if labels else ""
                            ax.set_title(f"input{name}\n{gmacs:.4g} GMACs, predicted {pred}", fontsize=7.5)
                        else:
                            ax.axis("off")
                        continue
                    ax.imshow(tiles[i][col - 1])
                    ax.set_title(f"{counts[i][col - 1]} tokens", fontsize=6.5)
                    if i == 0:
                        ax.set_title(f"stage {col}\n{counts[i][col - 1]} tokens", fontsize=7.5)
                    if col == 1:
                        ax.set_ylabel(f"stride {4 * 2 ** i}", fontsize=7.5)
        return save_figure(fig, path, f"{title} budget {self.budget:g}" if title else None, dpi=100)

    def extra_repr(self) -> str:
        forced = sorted({m for m in self.gate_override.values()})
        return (f"budget={self.budget}, window={self.window}, columns={self.columns}, nodes={len(self.nodes)}, "
                f"dense_above={self.dense_above}"
                + (f", forced={forced}" if forced else ""))


def stage_activity(info: ReductionInfo) -> list:
    """[scale i][stage k] -> (B, N_i) bool: tokens of scale i that ran a block in a column of PVTv2 stage k
    (the paper's visualisation: rows = strides, columns = stages)."""
    stage_of, sizes = info.extra["stage_of"], info.extra["scale_sizes"]
    B = info.extra["gmacs"].shape[0]
    device = info.extra["gmacs"].device
    out = [[torch.zeros(B, h * w, dtype=torch.bool, device=device) for _ in range(4)] for h, w in sizes]
    for name, ran in zip(info.extra["nodes"], info.extra["ran"]):
        i, j = (int(p[1:]) for p in name.split("."))
        if j < len(stage_of):
            out[i][stage_of[j]] |= ran
    return out


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


def _dit_criterion(model: nn.Module, smoothing: float = 0.0, distill: bool = False, **options) -> nn.Module:
    from ..losses_dit import dit_criterion  # losses_dit imports this module (budget_loss, check_budget)

    return dit_criterion(model, smoothing=smoothing, **options)


RECIPE = Recipe("dit", "DiT (docs/dit.md): DeiT schedule, budget loss switched on after 40% of training; lr 1e-2 x "
                "B/512 is the gates', the backbone's is x 0.05 (DeiT's 5e-4)", epochs=300, lr=1e-2, lr_batch=512,
                min_lr=1e-5, warmup_epochs=5, weight_decay=0.05, backbone_lr_scale=0.05, head_patterns=("gates.*",),
                find_unused_parameters=True)

register_model_family(FamilySpec(
    "dit", params=("budget", "gate_bias", "window", "dense_above"), primary="budget", recipe=RECIPE,
    criterion=_dit_criterion,
    doc="DiT: a multi-scale routing grid with per-token gates over a PVTv2 (a model family: `dit:B` builds the "
        "DiT twin at budget B)",
    info_fields={"gmacs": "(B,) GMACs each image's routing spent",
                 "gmacs_twin": "GMACs of the PVTv2 twin (its route through the grid), the budget's denominator",
                 "gmacs_full": "the same as gmacs_twin (the name older scripts read)",
                 "gmacs_space": "GMACs of the full routing space (every gate open)",
                 "executed_gmacs": "GMACs the batch really executed", "budget": "the model's target fraction",
                 "nodes": "node names s{scale}.c{column}", "alive": "per node, (B, N_s) tokens that reached it",
                 "ran": "per node, (B, N_s) tokens that ran its block",
                 "sent": "per node, (B, N_s) tokens sent down to the next scale",
                 "scale_tokens": "(B, columns, 4) tokens that ran a block, per column and scale",
                 "scale_sizes": "(h, w) token grid of each scale", "stage_of": "PVTv2 stage of each column"},
    owns=lambda name: name.startswith("dit_"), model_for=_dit_model_for,
    dense_for=lambda name: "pvt_v2_" + name[len("dit_"):] if name.startswith("dit_") else name))
