"""M2ORT (Wang et al., IJCAI 2024): a spot's multi-level patch -> level-dependent embedding -> cross-level attention.

Reimplemented from the description in ``SEED_SYSTEMS.md`` §1 (no code of the public repository is used). The network
reads a *patch table* (``bt.pp.spot_patches``): one row per image token of a spot's patch, a token's features being
the concatenation over the patch's levels of that level's pixel block (uint8) or encoder token (float16). The tokens
of a spot are laid out on its ``grid x grid`` lattice by their positions, a cls token is prepended, and Transformer
blocks of attention (queries, keys and values from the level-1, -2 and -3 channel groups in the published code) and
feed-forward layers (mixing the levels' channels) end in a linear head on the cls token.

This module also holds what the patch models share (:class:`PatchArchitecture`, :func:`patch_grid`,
:func:`dihedral`); only imported from inside :mod:`bitro.tl` functions (it imports torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bitro._constants import Key
from bitro.tl.models._base import Architecture, Batch, CellBagNetwork

#: What a patch table's tokens hold: raw pixel blocks (uint8, 0-255) or frozen encoder tokens.
KINDS: tuple[str, ...] = ("pixels", "tokens")
#: The keys of ``features["patch_layout"]`` a patch model reads.
LAYOUT_KEYS: tuple[str, ...] = ("kind", "grid", "level_dims", "token_um")


# -- what the patch models share ---------------------------------------------------------------------------------
@dataclass
class PatchArchitecture(Architecture):
    """Base of the hyper-parameters of the networks that read a patch table (``bt.pp.spot_patches``).

    The layout fields are copied from the table's ``patch_layout`` by :meth:`for_data` (they are not options):
    ``kind`` (``"pixels"``: uint8 pixel blocks, ``"tokens"``: encoder tokens), ``grid`` (tokens per side of a spot's
    patch), ``token_um`` (micrometres between neighbouring tokens) and ``level_dims`` (the width of each level's block
    in a token's features; empty when the architecture was made without a table, to check options only).
    ``variant`` names a preset of the size fields a subclass lists in :attr:`variants`; a size field left ``None``
    takes the variant's value, one given overrides it.
    """

    variant: str = "cpu"
    kind: str = "tokens"
    grid: int = 1
    token_um: float = 1.0
    level_dims: list[int] = field(default_factory=list)

    data_fields = ("n_features", "n_genes", "kind", "grid", "token_um", "level_dims")
    input_table = Key.PATCHES_TABLE
    default_rep = Key.PATCHES
    #: The model's registry name (for messages).
    model_name: ClassVar[str] = ""
    #: The presets of the size fields, by variant name.
    variants: ClassVar[dict[str, dict[str, int]]] = {}

    def __post_init__(self) -> None:
        if not isinstance(self.variant, str) or self.variant not in self.variants:
            msg = f"variant={self.variant!r} is not a variant of {self.model_name}; use one of {sorted(self.variants)}."
            raise ValueError(msg)
        for name, value in self.variant_values().items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__()

    def variant_values(self) -> dict[str, int]:
        """The size fields of :attr:`variant`."""
        return dict(self.variants[self.variant])

    def validate(self) -> None:
        """The size fields and the patch layout (widths add up to ``n_features``; pixel blocks are square RGB)."""
        from bitro._checks import check_int, is_int

        for name in self.variants[self.variant]:
            check_int(name, getattr(self, name), minimum=0 if name.endswith("depth") else 1)
        if self.kind not in KINDS:
            msg = f"kind={self.kind!r} is not a patch kind; the patch table's layout must say one of {KINDS}."
            raise ValueError(msg)
        if self.grid < 1 or self.token_um <= 0:
            msg = f"The patch layout needs grid >= 1 and token_um > 0, got grid={self.grid!r}, token_um={self.token_um!r}."
            raise ValueError(msg)
        dims = self.level_dims
        if not isinstance(dims, list) or not all(is_int(d) and d > 0 for d in dims):
            msg = f"level_dims must be a list of positive integers (one width per level), got {dims!r}."
            raise TypeError(msg)
        if not dims:
            return
        if sum(dims) != self.n_features:
            msg = (
                f"The patch table's tokens have {self.n_features} features but its layout lists levels of widths "
                f"{dims} (sum {sum(dims)}); make the patch table again with `bt.pp.spot_patches`."
            )
            raise ValueError(msg)
        if self.kind == "pixels":
            bad = [d for d in dims if d % 3 or math.isqrt(d // 3) ** 2 != d // 3]
            if bad:
                msg = f"Pixel levels must be square RGB blocks (3 * side**2 values), got widths {bad}."
                raise ValueError(msg)

    @property
    def n_levels(self) -> int:
        """Number of levels (scales) of the patch."""
        return len(self.level_dims)

    @property
    def blocks(self) -> list[int] | None:
        """The side (pixels) of each level's block for pixel tables, ``None`` for token tables."""
        return [math.isqrt(d // 3) for d in self.level_dims] if self.kind == "pixels" else None

    @classmethod
    def for_data(
        cls, *, n_features: int, n_genes: int, bag_sizes: Any, features: dict[str, Any] | None = None, **options: Any
    ) -> PatchArchitecture:
        """The architecture for a patch table's layout (``features["patch_layout"]``) and the user's options.

        ``features=None`` (checking the options only) gives an architecture without a layout, which cannot build a
        network. A table without a patch layout (a cell table) is refused.
        """
        cls.check_options(options)
        return cls.from_dict({"n_features": n_features, "n_genes": n_genes, **cls.layout_of(features), **options})

    @classmethod
    def layout_of(cls, features: dict[str, Any] | None) -> dict[str, Any]:
        """The layout fields from what a token table records of its features (``{}`` for ``None``)."""
        if features is None:
            return {}
        layout = features.get("patch_layout") if isinstance(features, dict) else None
        if layout is None:
            msg = (
                f"model={cls.model_name!r} reads spot patches: run `bt.pp.spot_patches(sdata)` and train on the "
                f"patch table it writes (sdata[{Key.PATCHES_TABLE!r}], features .obsm[{Key.PATCHES!r}]); the table "
                "given has no patch layout (a cell table?)."
            )
            raise ValueError(msg)
        missing = [k for k in LAYOUT_KEYS if k not in layout]
        if missing:
            msg = f"The patch table's layout lacks {missing}; make it again with `bt.pp.spot_patches`."
            raise ValueError(msg)
        token_um = layout["token_um"]
        return {
            "kind": layout["kind"],
            "grid": layout["grid"],
            "token_um": float(token_um) if isinstance(token_um, int) and not isinstance(token_um, bool) else token_um,
            "level_dims": list(layout["level_dims"]),
        }

    def check_layout(self) -> None:
        """Raise unless the architecture was made for a patch table (it has levels)."""
        if not self.level_dims:
            msg = (
                f"This {type(self).__name__} has no patch layout (made without a patch table, to check options); "
                f"build it with `{type(self).__name__}.for_data(..., features=...)` from a `bt.pp.spot_patches` table."
            )
            raise ValueError(msg)


def patch_grid(batch: Batch, grid: int, token_um: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's pooled tokens in their spots' grid slots: ``(n_bags, grid**2, n_features)`` and a mask.

    A token's slot is ``row * grid + col`` with ``(col, row) = round(pos / token_um + (grid - 1) / 2)``; slots with no
    token (dropped or never made) hold zeros and are False in the ``(n_bags, grid**2)`` mask. The features keep
    their dtype.
    """
    keep = batch.pool
    x, pos, bag = batch.x[keep], batch.pos[keep], batch.pooled_bag
    centre = (grid - 1) / 2
    where = pos.to(torch.float32) / token_um + centre
    idx = torch.round(where).long()
    if len(idx) and (((idx < 0) | (idx >= grid)).any() or (where - idx).abs().max() > 0.25):
        msg = (
            f"The tokens' positions do not fall on the model's {grid} x {grid} grid of {token_um:g} um tokens: the "
            "patch table was made with other settings than the model's; make it with the model's `bt.pp.spot_patches` "
            "settings."
        )
        raise ValueError(msg)
    slot = idx[:, 1] * grid + idx[:, 0]
    dense = x.new_zeros((batch.n_bags, grid * grid, x.shape[1]))
    dense[bag, slot] = x
    mask = torch.zeros((batch.n_bags, grid * grid), dtype=torch.bool, device=x.device)
    mask[bag, slot] = True
    return dense, mask


def _turn(t: torch.Tensor, k: int, dims: tuple[int, int]) -> torch.Tensor:
    """Element ``k`` (0-7) of the dihedral group on two axes: ``k % 4`` quarter turns, then a flip of the second axis."""
    t = torch.rot90(t, k % 4, dims)
    return t.flip(dims[1]) if k >= 4 else t


def dihedral(
    x: torch.Tensor, mask: torch.Tensor, grid: int, blocks: list[int] | None, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each bag's grid tokens turned and flipped by its element ``k[b]`` (0-7) of the dihedral group.

    ``x``: ``(n_bags, grid**2, n_features)`` as :func:`patch_grid` gives it; ``mask`` ``(n_bags, grid**2)``. With
    ``blocks`` (the pixel side of each level's block, pixel tables) the pixels inside every block are turned with
    the grid, so the result is the tokens of the turned patch. Encoder tokens (``blocks=None``) only move.
    """
    g = grid
    out_x, out_m = torch.empty_like(x), torch.empty_like(mask)
    for t in torch.unique(k).tolist():
        sel = torch.nonzero(k == t).squeeze(1)
        xs = x[sel].reshape(len(sel), g, g, -1)
        if blocks is None:
            xs = _turn(xs, t, (1, 2))
        else:
            parts = xs.split([3 * b * b for b in blocks], dim=-1)
            xs = torch.cat(
                [
                    _turn(_turn(p.reshape(len(sel), g, g, b, b, 3), t, (1, 2)), t, (3, 4)).reshape(len(sel), g, g, -1)
                    for p, b in zip(parts, blocks, strict=True)
                ],
                dim=-1,
            )
        out_x[sel] = xs.reshape(len(sel), g * g, -1)
        out_m[sel] = _turn(mask[sel].reshape(len(sel), g, g), t, (1, 2)).reshape(len(sel), g * g)
    return out_x, out_m


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``h`` ``(n, length, d)`` over the positions where ``mask`` ``(n, length)`` is True."""
    w = mask.to(h.dtype)[:, :, None]
    return (h * w).sum(1) / w.sum(1).clamp_min(1.0)


# -- M2ORT ---------------------------------------------------------------------------------------------------------
#: The variants' sizes: the published small / base (``"published"``) / large configurations of ``train_m2ort.py``,
#: and ``"cpu"``, the shrunken one that trains on 2 CPU cores in minutes (SEED_SYSTEMS §1.6).
M2ORT_VARIANTS: dict[str, dict[str, int]] = {
    "cpu": {"dim": 192, "depth": 4, "heads": 4, "dim_head": 32, "mlp_dim": 384},
    "small": {"dim": 576, "depth": 6, "heads": 9, "dim_head": 64, "mlp_dim": 384},
    "published": {"dim": 768, "depth": 8, "heads": 12, "dim_head": 64, "mlp_dim": 512},
    "large": {"dim": 1152, "depth": 12, "heads": 18, "dim_head": 64, "mlp_dim": 768},
}
#: ``"cross_level"``: queries from the level-1 channels, keys from level 2, values from level 3 (the public code);
#: ``"per_level"``: self-attention within each level's channel group (the literal "intra-level token mixing").
QKV_MODES: tuple[str, ...] = ("cross_level", "per_level")


@dataclass
class M2ORTArchitecture(PatchArchitecture):
    """Hyper-parameters of :class:`M2ORTNet` (stored in the model's JSON config).

    Parameters
    ----------
    variant
        Preset of the sizes: ``"cpu"`` (default; dim 192, depth 4, heads 4, dim_head 32, mlp 384: trains on 2 CPU
        cores in minutes), ``"small"`` (576, 6, 9, 64, 384), ``"published"`` (the paper's base: 768, 8, 12, 64, 512)
        or ``"large"`` (1152, 12, 18, 64, 768).
    dim, depth, heads, dim_head, mlp_dim
        Token width (divisible by the number of levels: each level gets ``dim / levels`` channels), number of
        blocks, attention heads, width per head and feed-forward width; ``None`` takes the variant's.
    dropout
        Dropout of the embedding, attention and feed-forward layers (0: the public code's effective value, its
        ``--dropout`` is never used).
    qkv
        ``"cross_level"`` (the public code; needs 3 levels) or ``"per_level"``; see :data:`QKV_MODES`.
    augment
        Train on a random dihedral turn / flip of each spot's patch (pixel blocks turn with the grid; encoder
        tokens only move).
    """

    dim: int | None = None
    depth: int | None = None
    heads: int | None = None
    dim_head: int | None = None
    mlp_dim: int | None = None
    dropout: float = 0.0
    qkv: str = "cross_level"
    augment: bool = True

    model_name = "m2ort"
    variants = M2ORT_VARIANTS

    def validate(self) -> None:
        """Sizes, rates, the attention mode and what it needs of the layout."""
        super().validate()
        if not 0 <= self.dropout < 1:
            msg = f"`dropout` must be in [0, 1), got {self.dropout!r}."
            raise ValueError(msg)
        if self.qkv not in QKV_MODES:
            msg = f"qkv={self.qkv!r} is not supported; use one of {QKV_MODES}."
            raise ValueError(msg)
        if not self.level_dims:
            return
        if self.dim % self.n_levels:
            msg = (
                f"`dim` ({self.dim}) must be divisible by the number of levels of the patches ({self.n_levels}); "
                f"e.g. dim={self.n_levels * 64}."
            )
            raise ValueError(msg)
        if self.qkv == "cross_level" and self.n_levels != 3:
            msg = (
                f"qkv='cross_level' takes queries, keys and values from 3 levels, but the patches have {self.n_levels}; "
                "use qkv='per_level', or make 3-level patches with `bt.pp.spot_patches`."
            )
            raise ValueError(msg)


class LevelEmbedding(nn.Module):
    """One level's token embedding to ``out_dim`` channels.

    Pixels: LN -> Linear(in, hidden) -> GELU -> Linear(hidden, out) -> LN (M2ORT's level-dependent patch embedding).
    Encoder tokens: LN -> Linear(in, out) (not faithful, but works with little data).
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, pixels: bool):
        super().__init__()
        if pixels:
            self.net = nn.Sequential(
                nn.LayerNorm(in_dim),
                nn.Linear(in_dim, hidden),
                nn.GELU(),
                nn.Linear(hidden, out_dim),
                nn.LayerNorm(out_dim),
            )
        else:
            self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed ``(..., in_dim)`` to ``(..., out_dim)``."""
        return self.net(x)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(n, length, heads * d)`` -> ``(n, heads, length, d)``."""
    n, length, _ = t.shape
    return t.view(n, length, heads, -1).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    """``(n, heads, length, d)`` -> ``(n, length, heads * d)``."""
    n, h, length, d = t.shape
    return t.transpose(1, 2).reshape(n, length, h * d)


class LevelAttention(nn.Module):
    """M2ORT's attention: LayerNorm, then attention between or within the levels' channel groups.

    ``"cross_level"``: ``q = to_q(level 1)``, ``k = to_k(level 2)``, ``v = to_v(level 3)`` (bias-free, ``heads *
    dim_head`` wide), softmax attention scaled by ``dim_head**-0.5``, ``out`` back to ``dim``. ``"per_level"``: each
    level's group attends within itself (its own ``to_qkv`` and ``out`` to ``dim / levels``), the groups concatenated.
    Keys where ``mask`` is False (missing tokens) are ignored.
    """

    def __init__(self, dim: int, levels: int, heads: int, dim_head: int, dropout: float, mode: str):
        super().__init__()
        self.levels, self.heads, self.mode, self.dropout = levels, heads, mode, dropout
        d, inner = dim // levels, heads * dim_head
        self.norm = nn.LayerNorm(dim)
        if mode == "cross_level":
            self.to_q, self.to_k, self.to_v = (nn.Linear(d, inner, bias=False) for _ in range(3))
            self.out = nn.Linear(inner, dim)
        else:
            self.groups = nn.ModuleList(_LevelSelfAttention(d, inner) for _ in range(levels))
        self.drop = nn.Dropout(dropout)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Multi-head softmax attention of ``(n, length, inner)`` tensors; ``mask`` ``(n, length)`` of keys."""
        h = self.heads
        att = F.scaled_dot_product_attention(
            _heads(q, h),
            _heads(k, h),
            _heads(v, h),
            attn_mask=mask[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        return _merge(att)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attention update of ``x`` ``(n, length, dim)`` (without the residual)."""
        chunks = self.norm(x).chunk(self.levels, dim=-1)
        if self.mode == "cross_level":
            return self.drop(
                self.out(self.attend(self.to_q(chunks[0]), self.to_k(chunks[1]), self.to_v(chunks[2]), mask))
            )
        outs = []
        for group, c in zip(self.groups, chunks, strict=True):
            q, k, v = group.to_qkv(c).chunk(3, dim=-1)
            outs.append(group.out(self.attend(q, k, v, mask)))
        return self.drop(torch.cat(outs, dim=-1))


class _LevelSelfAttention(nn.Module):
    """The projections of one level's self-attention (``qkv="per_level"``)."""

    def __init__(self, d: int, inner: int):
        super().__init__()
        self.to_qkv = nn.Linear(d, 3 * inner, bias=False)
        self.out = nn.Linear(inner, d)


class FeedForward(nn.Module):
    """LN -> Linear(dim, mlp) -> GELU -> Dropout -> Linear(mlp, dim) -> Dropout: mixes the levels' channels."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ff1, self.ff2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward update of ``x`` (without the residual)."""
        return self.drop(self.ff2(self.drop(F.gelu(self.ff1(self.norm(x))))))


class M2ORTBlock(nn.Module):
    """``x = attn(x) + x; x = ff(x) + x``."""

    def __init__(self, arch: M2ORTArchitecture):
        super().__init__()
        self.attn = LevelAttention(arch.dim, arch.n_levels, arch.heads, arch.dim_head, arch.dropout, arch.qkv)
        self.ff = FeedForward(arch.dim, arch.mlp_dim, arch.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Update ``x`` ``(n, length, dim)``; ``mask`` ``(n, length)``: True for present tokens."""
        x = self.attn(x, mask) + x
        return self.ff(x) + x


class M2ORTNet(CellBagNetwork):
    """The M2ORT network on a patch table: one prediction per spot from the tokens of its patch.

    tokens in grid slots -> per level :class:`LevelEmbedding` to ``dim / levels`` channels, concatenated to ``dim``
    -> cls token + learned position embedding (``grid**2 + 1``) -> :class:`M2ORTBlock` x ``depth`` -> LayerNorm ->
    ``head`` Linear(dim, n_genes) on the cls token. Missing tokens are zeros and masked out of the attention's keys.
    In training with ``augment`` each spot's patch is turned / flipped at random (:func:`dihedral`). The tokens'
    values returned beside the spots' predictions are their spot's prediction (tokens are not cells).

    Parameters
    ----------
    arch
        The :class:`M2ORTArchitecture`, made for a patch table by :meth:`M2ORTArchitecture.for_data`.
    """

    architecture_class = M2ORTArchitecture
    gene_params = ("head.weight", "head.bias")

    def __init__(self, arch: M2ORTArchitecture):
        super().__init__(arch)
        arch.check_layout()
        d, n_levels = arch.dim, arch.n_levels
        pixels = arch.kind == "pixels"
        self.embed = nn.ModuleList(
            LevelEmbedding(width, max(1, d // 2**level), d // n_levels, pixels)
            for level, width in enumerate(arch.level_dims)
        )
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embedding = nn.Parameter(torch.randn(1, arch.grid**2 + 1, d))
        self.emb_drop = nn.Dropout(arch.dropout)
        self.blocks = nn.ModuleList(M2ORTBlock(arch) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, arch.n_genes)

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The layers :func:`bitro.tl.transfer` puts LoRA adapters on by default: attention and feed-forward."""
        attn = ("to_q", "to_k", "to_v") if self.arch.qkv == "cross_level" else ("to_qkv",)
        return (*attn, "out", "ff1", "ff2") if self.arch.depth else ()

    def tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The spots' tokens ``(n_bags, grid**2, n_features)`` as floats (pixels in [0, 1]), and their mask.

        Turned / flipped at random in training with ``augment``.
        """
        arch = self.arch
        x, mask = patch_grid(batch, arch.grid, arch.token_um)
        if self.training and arch.augment:
            x, mask = dihedral(x, mask, arch.grid, arch.blocks, torch.randint(0, 8, (x.shape[0],), device=x.device))
        x = x.to(self.head.weight.dtype)
        return (x / 255.0 if arch.kind == "pixels" else x), mask

    def encode(self, batch: Batch) -> torch.Tensor:
        """The cls token's embedding ``(n_bags, dim)`` after the blocks and the final LayerNorm."""
        x, mask = self.tokens(batch)
        h = torch.cat([emb(p) for emb, p in zip(self.embed, x.split(self.arch.level_dims, dim=-1), strict=True)], -1)
        n = h.shape[0]
        h = torch.cat([self.cls_token.expand(n, -1, -1), h], dim=1) + self.pos_embedding
        h = self.emb_drop(h)
        mask = torch.cat([mask.new_ones((n, 1)), mask], dim=1)
        for block in self.blocks:
            h = block(h, mask)
        return self.norm(h[:, 0])

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The spots' predictions ``(n_bags, n_genes)`` (z-scores), and each pooled token's (its spot's)."""
        y = self.head(self.encode(batch))
        return y, y[batch.pooled_bag]
