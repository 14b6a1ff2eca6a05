"""The BiTro network (torch + torch_geometric): cells -> GAT -> Transformer -> gene-query pooling -> readout.

Only imported from inside :mod:`bitro.tl` functions, so ``import bitro`` stays free of torch.

Every projection that LoRA (:mod:`peft`) should be able to reach is an explicit :class:`torch.nn.Linear`:
``in_proj``, ``pos_proj``, each Transformer layer's ``q``/``k``/``v``/``o``/``ff1``/``ff2`` and the shared
readout MLP. Attention is :func:`torch.nn.functional.scaled_dot_product_attention` with a key padding mask,
so a bag's prediction does not depend on which bags share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GATConv
from torch_geometric.utils import to_dense_batch

from bitro.tl.models._base import Architecture, Batch, CellBagNetwork, fit_bank, token_groups

if TYPE_CHECKING:
    from bitro.tl._bags import CellData, Seq

#: Wavelengths (micrometres) of the Fourier position features.
POSITION_WAVELENGTHS_UM: tuple[float, ...] = (12.5, 25.0, 50.0, 100.0, 200.0, 400.0)
#: Length (micrometres) that linear position features are divided by.
POSITION_UNIT_UM: float = 100.0


#: ``"gene"``: a linear output per gene on the attention-pooled embedding (LayerNorm first); ``"shared"``: the
#: paper's MLP shared by all genes; ``"cell"``: the same per-gene linear output applied to every cell's own
#: embedding, the bag's prediction being the attention-weighted mean of its cells' (so each cell has a value of
#: its own, on the bag's scale, independent of how many cells share the bag).
READOUTS: tuple[str, ...] = ("gene", "shared", "cell")
#: The rank of the gene space :func:`bitro.tl.fit` gives a new BiTro network (``gene_rank``). Measured
#: (``docs/benchmarks.md``, "A gene space for BiTro"): HER2ST leave-one-section-out PCC_gene 0.149 with 5 (0.145 with
#: 10, 0.140 with 20) against 0.133 with one free output row per gene (0).
DEFAULT_GENE_RANK: int = 5
#: The share of a spot model's prediction :func:`bitro.tl.fit` gives to retrieval (``retrieval_weight``): each
#: predicted profile is blended with the similarity-weighted mean of the training spots' measured profiles
#: (:meth:`BitroNet.retrieve`). Measured in ``docs/benchmarks.md`` ("Retrieval blended with regression").
DEFAULT_RETRIEVAL_WEIGHT: float = 0.5
#: The radii (um) of the fields of cells :func:`bitro.tl.fit` gives a new spot model (``field_radii``): each spot's
#: sequence gets one token per radius, the mean features of the cells within it (fields of 150, 300 and 600 um, those
#: of the multi-scale image baseline of the guide). Measured in ``docs/benchmarks.md`` ("Fields of cells").
DEFAULT_FIELD_RADII: tuple[float, ...] = (75.0, 150.0, 300.0)


@dataclass
class BitroArchitecture(Architecture):
    """Hyper-parameters of :class:`BitroNet` and of its loss (stored in the model's JSON config).

    ``size_mean`` / ``size_std``: the training bags' ``log1p`` cell counts, which the bag-size term standardises;
    ``cluster_weight``: the weight of the paper's cluster loss (0: none).
    """

    dim: int = 64
    #: 0 by default: message passing on the kNN graph blends each cell with its neighbours before the per-cell
    #: readout, which costs the cells their own values (docs/benchmarks.md, "GAT and the cells"); 1 is the paper's.
    gat_layers: int = 0
    gat_heads: int = 4
    transformer_layers: int = 1
    transformer_heads: int = 4
    ff_dim: int = 128
    dropout: float = 0.1
    readout: str = "cell"
    readout_hidden: int = 64
    bag_size: bool = True
    size_mean: float = 0.0
    size_std: float = 1.0
    cluster_weight: float = 0.1
    #: Rank of the gene space the per-gene query and output weights are factored through (0: one free row per
    #: gene): their rows are ``basis @ W`` with the basis the top principal axes of the training targets (fixed,
    #: from :meth:`BitroNet.prepare`), so the genes share strength instead of each fitting its own noise. 0 here, so
    #: that models saved before the option load as they were; :func:`bitro.tl.fit` trains with
    #: :data:`DEFAULT_GENE_RANK` unless told otherwise.
    gene_rank: int = 0
    #: With ``gene_rank``: whether the gene queries of the attention pooling are factored too (else one per gene).
    rank_queries: bool = True
    #: Width of the auxiliary target (``aux_key`` of :func:`bitro.tl.fit`, e.g. an expression latent), predicted by
    #: a small head from the pooled spot embedding during training only; 0: no auxiliary head (set from the data).
    aux_dim: int = 0
    #: Weight of the auxiliary loss (MSE on the z-scored auxiliary target) beside the gene loss.
    aux_weight: float = 1.0
    #: Share of retrieval in each prediction (0: none; 1: retrieval alone): the prediction is blended with the
    #: softmax-weighted mean of the training bags' measured (z-scored) profiles, weighted by their cosine similarity
    #: to the predicted profile (:meth:`BitroNet.retrieve`). 0 here, so that models saved before the option load as
    #: they were; :func:`bitro.tl.fit` gives spot models :data:`DEFAULT_RETRIEVAL_WEIGHT` unless told otherwise.
    retrieval_weight: float = 0.0
    #: Softmax temperature of the retrieval's cosine similarities (smaller: fewer, closer training bags).
    retrieval_temperature: float = 0.1
    #: Width of each spot's patch embedding (``patch_key`` of :func:`bitro.tl.fit`, e.g. frozen EfficientNet-Lite0
    #: embeddings of several fields of view around the spot, concatenated); 0: no patch tokens (set from the data).
    patch_dim: int = 0
    #: How many tokens the patch embedding is cut into, one per scale (equal chunks of ``patch_dim``), each standardised
    #: with the training spots' statistics and projected into the model by a linear layer of its own; the tokens join
    #: every spot's Transformer sequence beside its cells (attended to, not pooled). 0 with ``patch_dim``: 1.
    patch_scales: int = 0
    #: Field tokens (radii in um; empty: none): each spot's sequence gets one token per radius, the mean features of
    #: the cells within that distance of its centre, built from the cell table for any spot, measured or virtual, so
    #: they need no image. They ride on the patch-token path (``patch_dim`` = radii x features, one scale per radius)
    #: and are left out of bulk bags, which have no centre. Empty here, so that models saved before the option load as
    #: they were; :func:`bitro.tl.fit` gives spot models :data:`DEFAULT_FIELD_RADII` unless told otherwise.
    field_radii: tuple[float, ...] = ()

    data_fields = ("n_features", "n_genes", "size_mean", "size_std", "aux_dim", "patch_dim")
    extra_options = ("heads",)

    def validate(self) -> None:
        """Readout, widths and rates in range."""
        if self.readout not in READOUTS:
            msg = f"readout={self.readout!r} is not supported; use one of {READOUTS}."
            raise ValueError(msg)
        for name in ("dim", "gat_heads", "transformer_heads", "ff_dim", "readout_hidden"):
            if getattr(self, name) < 1:
                msg = f"`{name}` must be at least 1, got {getattr(self, name)!r}."
                raise ValueError(msg)
        for heads in ("gat_heads", "transformer_heads"):
            if self.dim % getattr(self, heads):
                msg = f"`dim` ({self.dim}) must be divisible by `{heads}` ({getattr(self, heads)}); e.g. dim={getattr(self, heads) * 16}."
                raise ValueError(msg)
        if not 0 <= self.dropout < 1:
            msg = f"`dropout` must be in [0, 1), got {self.dropout!r}."
            raise ValueError(msg)
        if self.aux_weight < 0:
            msg = f"`aux_weight` must be >= 0, got {self.aux_weight!r}."
            raise ValueError(msg)
        if not 0 <= self.retrieval_weight <= 1 or self.retrieval_temperature <= 0:
            msg = (
                f"`retrieval_weight` must be in [0, 1] (0: no retrieval) and `retrieval_temperature` > 0, got "
                f"{self.retrieval_weight!r} and {self.retrieval_temperature!r}."
            )
            raise ValueError(msg)
        from bitro._checks import is_number

        radii = self.field_radii
        if not (
            isinstance(radii, list | tuple) and all(is_number(r) and np.isfinite(r) and r > 0 for r in radii)
        ) or len(set(radii)) != len(radii):
            msg = f"`field_radii` must be distinct positive radii in um (e.g. (75, 150, 300); () for none), got {radii!r}."
            raise ValueError(msg)
        self.field_radii = tuple(float(r) for r in radii)
        if self.field_radii and self.patch_dim and self.patch_dim != len(radii) * self.n_features:
            msg = (
                f"Field tokens give {len(radii)} x {self.n_features} features per spot, but patch_dim is "
                f"{self.patch_dim}: fields of cells and a patch embedding (`patch_key`) cannot be combined."
            )
            raise ValueError(msg)
        if self.patch_dim:
            scales = self.patch_scales or 1
            if self.patch_dim % scales:
                msg = (
                    f"`patch_scales` ({scales}) must divide the width of the patch embedding ({self.patch_dim}): one "
                    "equal chunk of it per scale."
                )
                raise ValueError(msg)
            if self.transformer_layers < 1:
                msg = (
                    "Patch or field tokens (`patch_key`, `field_radii`) join the cells in the Transformer, which is off "
                    "(transformer_layers=0); set transformer_layers >= 1, or drop patch_key / set field_radii=()."
                )
                raise ValueError(msg)
        if self.cluster_weight < 0 or self.size_std <= 0:
            msg = f"`cluster_weight` must be >= 0 and `size_std` > 0, got {self.cluster_weight!r} and {self.size_std!r}."
            raise ValueError(msg)

    @classmethod
    def for_data(cls, *, n_features: int, n_genes: int, bag_sizes, features=None, **options) -> BitroArchitecture:
        """The architecture with the training bags' size statistics (``heads`` sets both kinds of attention heads)."""
        cls.check_options(options)
        heads = options.pop("heads", None)
        if heads is not None:
            from bitro._checks import check_int

            check_int("heads", heads, minimum=1)
            dim = options.get("dim", cls.dim)
            if isinstance(dim, int) and dim % heads:
                msg = f"`dim` ({dim}) must be divisible by `heads` ({heads}); e.g. dim={heads * 16}."
                raise ValueError(msg)
            options = {"gat_heads": heads, "transformer_heads": heads, **options}
        options.setdefault("gene_rank", DEFAULT_GENE_RANK)
        options.setdefault("retrieval_weight", DEFAULT_RETRIEVAL_WEIGHT)
        options.setdefault("field_radii", DEFAULT_FIELD_RADII)
        std = float(np.std(bag_sizes))
        stats = {"size_mean": float(np.mean(bag_sizes)), "size_std": std if std > 1e-6 else 1.0}
        return cls.from_dict({"n_features": n_features, "n_genes": n_genes, **stats, **options})

    @property
    def needs_phenotype(self) -> bool:
        """The cluster loss groups cells by phenotype."""
        return self.cluster_weight > 0


class TransformerLayer(nn.Module):
    """Pre-norm Transformer encoder layer with explicit q/k/v/o and feed-forward :class:`~torch.nn.Linear` layers."""

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        if dim % heads:
            msg = f"dim={dim} must be divisible by transformer_heads={heads}."
            raise ValueError(msg)
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(dim, ff_dim), nn.Linear(ff_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x``: ``(n_seq, length, dim)``; ``mask``: ``(n_seq, length)``, True for real tokens."""
        s, n, d = x.shape
        y = self.norm1(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(s, n, self.heads, d // self.heads).transpose(1, 2)

        att = F.scaled_dot_product_attention(
            split(self.q(y)),
            split(self.k(y)),
            split(self.v(y)),
            attn_mask=mask[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        x = x + self.drop(self.o(att.transpose(1, 2).reshape(s, n, d)))
        return x + self.drop(self.ff2(self.drop(F.gelu(self.ff1(self.norm2(x))))))


class GATBlock(nn.Module):
    """Residual GAT layer on the cell kNN graph: ``h + ReLU(LayerNorm(GATConv(h)))``."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            msg = f"dim={dim} must be divisible by gat_heads={heads}."
            raise ValueError(msg)
        self.conv = GATConv(dim, dim // heads, heads=heads, concat=True, dropout=dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Update the token embeddings ``h`` along ``edge_index``."""
        return h + F.relu(self.norm(self.conv(h, edge_index)))


def position_features(pos_um: torch.Tensor) -> torch.Tensor:
    """Fourier and linear features of positions given in micrometres (never rescaled per bag)."""
    w = torch.tensor(POSITION_WAVELENGTHS_UM, dtype=pos_um.dtype, device=pos_um.device)
    ang = 2 * math.pi * pos_um[:, :, None] / w  # (n, 2, n_wavelengths)
    return torch.cat([torch.sin(ang).flatten(1), torch.cos(ang).flatten(1), pos_um / POSITION_UNIT_UM], dim=1)


class BitroNet(CellBagNetwork):
    """The BiTro network.

    cells -> ``in_proj`` -> GAT layers (kNN graph) -> + position embedding (um) -> Transformer layers
    (context tokens included, and with ``patch_dim`` one token per scale of the spot's patch embedding, attended to
    but not pooled) -> gene-query attention pooling over the bag's pooled cells -> readout
    (per-gene linear weights, or the paper's MLP shared by all genes) -> one value per gene and bag.

    Attention pooling is a weighted mean, blind to how many cells a bag holds; with ``bag_size`` each gene
    also gets a linear term in the bag's standardised log cell count (tissue density drives a spot's
    library size and composition).
    """

    architecture_class = BitroArchitecture
    gene_params = ("gene_queries", "gene_weight", "gene_bias", "gene_size", "gene_basis")
    #: Parts of the gene head shared by all genes (not one row per gene): the readout MLP (``readout="shared"``)
    #: and, with a gene space (``gene_rank``), the factors the per-gene query and output rows are made from.
    shared_head = ("readout_mlp", "rank_queries", "rank_weight")
    #: The layers :func:`bitro.tl.transfer` puts LoRA adapters on by default, by target level: the attention query
    #: and value projections of every Transformer layer (the LoRA paper's choice, Hu et al. 2021), and towards spots
    #: also the cell features' input projection, which re-maps the cells to the new level. Chosen by the transfer
    #: map in ``docs/benchmarks.md``, "When does transfer pay off?": towards spots, with ``in_proj`` LoRA kept 91% of
    #: full fine-tuning's gain, with ``q``/``v`` alone 57%; towards bulk (a few profiles) ``in_proj`` gained less.
    lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {"spot": ("in_proj", "q", "v"), "bulk": ("q", "v")}

    def __init__(self, arch: BitroArchitecture):
        super().__init__(arch)
        d, g = arch.dim, arch.n_genes
        self.in_proj = nn.Linear(arch.n_features, d)
        self.in_drop = nn.Dropout(arch.dropout)
        self.gat = nn.ModuleList(GATBlock(d, arch.gat_heads, arch.dropout) for _ in range(arch.gat_layers))
        self.pos_proj = nn.Linear(4 * len(POSITION_WAVELENGTHS_UM) + 2, d)
        self.transformer = nn.ModuleList(
            TransformerLayer(d, arch.transformer_heads, arch.ff_dim, arch.dropout)
            for _ in range(arch.transformer_layers)
        )
        self.out_norm = nn.LayerNorm(d)
        r = min(arch.gene_rank, g)
        if r:  # the gene basis (orthonormal columns, scaled to unit root-mean-square entries) comes from prepare()
            self.register_buffer("gene_basis", torch.zeros(g, r))
        if r and arch.rank_queries:
            self.rank_queries = nn.Parameter(torch.randn(r, d) / math.sqrt(d))
        else:
            self.gene_queries = nn.Parameter(torch.randn(g, d) / math.sqrt(d))
        if arch.readout != "cell":
            self.pool_norm = nn.LayerNorm(d)
        if arch.readout in ("gene", "cell"):
            if r:
                self.rank_weight = nn.Parameter(torch.randn(r, d) / math.sqrt(d))
            else:
                self.gene_weight = nn.Parameter(torch.randn(g, d) / math.sqrt(d))
            self.gene_bias = nn.Parameter(torch.zeros(g))
        else:
            self.readout_mlp = nn.Sequential(
                nn.Linear(d, arch.readout_hidden), nn.ReLU(), nn.Linear(arch.readout_hidden, 1)
            )
        if arch.bag_size:
            self.gene_size = nn.Parameter(torch.zeros(g))
        if arch.aux_dim:  # the auxiliary target's head (training only)
            self.aux_norm = nn.LayerNorm(d)
            self.aux_head = nn.Linear(d, arch.aux_dim)
        if arch.retrieval_weight > 0:  # the training bags' z-scored targets, filled by prepare(), saved with the weights
            self.register_buffer("bank", torch.zeros(0, g))
        if arch.patch_dim:  # one projection per scale; the training spots' statistics from set_patch_scaling()
            scales = arch.patch_scales or 1
            self.patch_proj = nn.ModuleList(nn.Linear(arch.patch_dim // scales, d) for _ in range(scales))
            self.register_buffer("patch_mean", torch.zeros(arch.patch_dim))
            self.register_buffer("patch_std", torch.ones(arch.patch_dim))

    def set_patch_scaling(self, mean: np.ndarray, std: np.ndarray) -> BitroNet:
        """With patch tokens: the training spots' mean and standard deviation of each patch-embedding column.

        Every column is standardised with them before its scale's projection (:meth:`patch_tokens`); kept as buffers,
        so they are saved with the weights. Returns the network.
        """
        with torch.no_grad():
            self.patch_mean.copy_(torch.as_tensor(mean, dtype=self.patch_mean.dtype))
            self.patch_std.copy_(torch.as_tensor(std, dtype=self.patch_std.dtype))
        return self

    def patch_tokens(self, patch: torch.Tensor) -> torch.Tensor:
        """The patch tokens ``(n_seq, n_scales, dim)`` of the sequences' patch embeddings ``(n_seq, patch_dim)``.

        Each scale's chunk of the standardised embedding through its own linear layer (a level-dependent embedding,
        as M2ORT's), then the input dropout the cell tokens get.
        """
        z = (patch.to(self.patch_mean.dtype) - self.patch_mean) / self.patch_std
        chunks = z.view(z.shape[0], len(self.patch_proj), -1)
        return self.in_drop(torch.stack([proj(chunks[:, j]) for j, proj in enumerate(self.patch_proj)], dim=1))

    def prepare(self, target: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """With ``gene_rank``: the gene basis, the top principal axes of the training targets ``(n_bags, n_genes)``.

        Of the ``reference`` expression instead when given (other sections, z-scored like the targets). With
        ``retrieval_weight``: the training targets themselves, as the retrieval bank (:meth:`retrieve`).
        """
        self.set_bank(target)
        if not hasattr(self, "gene_basis"):
            return
        r = self.gene_basis.shape[1]
        source = target if reference is None else reference
        centred = source - source.mean(0)
        _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
        axes = vh[:r].T.to(self.gene_basis.dtype) * math.sqrt(vh.shape[1])  # fewer than r when there are few bags
        self.gene_basis.zero_()
        self.gene_basis[:, : axes.shape[1]] = axes

    def fill_gene_basis(self, target: torch.Tensor, new_rows: torch.Tensor) -> None:
        """Give genes new to the network (``new_rows``; their basis rows are 0) rows of the gene basis.

        For :func:`bitro.tl.transfer` to new genes: the bags' scores in the gene space are fitted from the genes it
        has (least squares on ``target``, the z-scored targets ``(n_bags, n_genes)``), then each new gene's row from
        those scores, so new genes live in the same gene space as the others.
        """
        if not hasattr(self, "gene_basis") or not bool(new_rows.any()) or bool(new_rows.all()):
            return
        basis, old = self.gene_basis, ~new_rows
        scores = torch.linalg.lstsq(basis[old].double(), target[:, old].T.double()).solution.T  # (n_bags, rank)
        rows = torch.linalg.lstsq(scores, target[:, new_rows].double()).solution.T  # (n_new, rank)
        with torch.no_grad():
            basis[new_rows] = rows.to(basis.dtype)

    def set_bank(self, target: torch.Tensor) -> None:
        """With ``retrieval_weight``: keep the training bags' z-scored targets ``(n_bags, n_genes)`` to retrieve from."""
        if hasattr(self, "bank"):
            self.bank = target.detach().to(device=self.bank.device, dtype=self.bank.dtype).clone()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if hasattr(self, "bank"):
            fit_bank(self, state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def retrieve(self, y: torch.Tensor) -> torch.Tensor:
        """Predicted profiles ``y`` ``(n, n_genes)`` (z-scores) blended with retrieval from the training bags.

        Each profile's retrieval is the mean of the bank's measured profiles (the training targets, per-sample
        centred and z-scored), weighted by the softmax of their cosine similarity to the profile over
        ``retrieval_temperature``, rescaled to the profile's norm; the result is ``(1 - w) * y + w * retrieval`` with
        ``w = retrieval_weight``. It pulls each prediction towards expression profiles that were measured, as
        CMRCNet's retrieval does, while keeping the network's own estimate. Unchanged without a bank. It acts on
        the bags' predictions (spots, slides); the ``"cell"`` readout's cells keep their own values.
        """
        w = self.arch.retrieval_weight
        bank = getattr(self, "bank", None)
        if not w or bank is None or bank.shape[0] < 2:
            return y
        bank = bank.to(y.dtype)
        sim = F.normalize(y, dim=-1) @ F.normalize(bank, dim=-1).T
        got = torch.softmax(sim / self.arch.retrieval_temperature, dim=-1) @ bank
        scale = y.norm(dim=-1, keepdim=True) / got.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return (1 - w) * y + w * scale * got

    def __getattr__(self, name: str) -> Any:
        if name in ("gene_queries", "gene_weight") and "gene_basis" in self._buffers:
            rank = "rank_queries" if name == "gene_queries" else "rank_weight"
            if rank in self._parameters:  # one row per gene, through the gene basis
                return self._buffers["gene_basis"] @ self._parameters[rank] / math.sqrt(self._buffers["gene_basis"].shape[1])
        return super().__getattr__(name)

    # -- pieces ----------------------------------------------------------------------------------
    def encode(self, batch: Batch) -> torch.Tensor:
        """Token embeddings ``(n_tokens, dim)`` after GAT and Transformer layers."""
        h = self.in_drop(self.in_proj(batch.x.float()))
        for block in self.gat:
            h = block(h, batch.edge_index)
        h = h + self.pos_proj(position_features(batch.pos))
        if len(self.transformer):
            hd, mask = to_dense_batch(h, batch.seq)
            n = hd.shape[1]
            if self.arch.patch_dim and batch.patch is None and not self.arch.field_radii:  # bulk bags have no fields
                msg = (
                    "This BiTro model reads each spot's patch embedding (`patch_key`), and the batch has none: "
                    "predict measured spots from a spot table that holds it."
                )
                raise ValueError(msg)
            if self.arch.patch_dim and batch.patch is not None:  # after the (padded) cells, never masked
                tokens = self.patch_tokens(batch.patch)
                hd = torch.cat([hd, tokens], dim=1)
                mask = torch.cat([mask, mask.new_ones(tokens.shape[:2])], dim=1)
            for layer in self.transformer:
                hd = layer(hd, mask)
            h = hd[:, :n][mask[:, :n]]
        return self.out_norm(h)

    def attend(self, h_pooled: torch.Tensor, bag: torch.Tensor, n_bags: int):
        """Gene-query attention pooling over each bag.

        Returns ``logits`` ``(n_pooled, n_genes)``, ``lse`` ``(n_bags, n_genes)`` (log-sum-exp of the
        logits per bag) and ``z`` ``(n_bags, n_genes, dim)`` (attention-weighted means). The attention of a
        cell is ``exp(logits - lse[bag])``; bags evaluated in parts combine exactly with
        :func:`combine_parts`.
        """
        hd, mask = to_dense_batch(h_pooled, bag, batch_size=n_bags)  # (B, L, d)
        logits = hd @ self.gene_queries.T / math.sqrt(hd.shape[-1])  # (B, L, G)
        logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
        lse = torch.logsumexp(logits, dim=1)  # (B, G)
        att = torch.exp(logits - lse[:, None, :]).nan_to_num(0.0)
        z = att.transpose(1, 2) @ hd  # (B, G, d)
        return logits[mask], lse, z

    def size_term(self, size: torch.Tensor) -> torch.Tensor | float:
        """Each gene's term in the bags' standardised log cell counts ``(n_bags, n_genes)`` (0 without ``bag_size``)."""
        if not self.arch.bag_size:
            return 0.0
        return self.gene_size * ((size.to(self.gene_size.dtype) - self.arch.size_mean) / self.arch.size_std)[:, None]

    def readout(self, z: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """Predictions ``(n_bags, n_genes)`` (z-scores) from the pooled embeddings and the bag sizes.

        ``z``: ``(n_bags, n_genes, dim)``; ``size``: ``(n_bags,)``, as :attr:`Batch.size`. With the ``"cell"``
        readout this equals the attention-weighted mean of the cells' own readouts (:meth:`cell_readout`): the
        readout is linear, so it commutes with the pooling.
        """
        if self.arch.readout == "cell":
            y = (z * self.gene_weight).sum(-1) + self.gene_bias
        elif self.arch.readout == "gene":
            y = (self.pool_norm(z) * self.gene_weight).sum(-1) + self.gene_bias
        else:
            y = self.readout_mlp(self.pool_norm(z)).squeeze(-1)
        return y + self.size_term(size)

    def cell_readout(self, h_pooled: torch.Tensor) -> torch.Tensor:
        """The ``"cell"`` readout of each pooled cell's own embedding ``(n_pooled, n_genes)``, before the bag-size term."""
        return h_pooled @ self.gene_weight.T + self.gene_bias

    def cell_expression(self, h_pooled: torch.Tensor, att: torch.Tensor, y: torch.Tensor, bag: torch.Tensor, size):
        """Each pooled cell's expression ``(n_pooled, n_genes)`` on the z-scored target scale.

        ``"cell"`` readout: the cell's own readout plus its bag's size term. Otherwise the paper's pseudo-cells
        scaled to the bag: ``n_b * A[g, i] * y[b, g]`` (attention relative to an equal share, times the bag's
        prediction). Either way the attention-weighted (``"cell"``) or plain mean over a bag's cells is its
        prediction.
        """
        if self.arch.readout == "cell":
            term = self.size_term(size)
            return self.cell_readout(h_pooled) + (term[bag] if torch.is_tensor(term) else term)
        n_per_bag = torch.bincount(bag, minlength=y.shape[0]).to(y.dtype)
        return att * y[bag] * n_per_bag[bag][:, None]

    def outputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predictions ``(n_bags, n_genes)``, and the attention and expression of every pooled token.

        Both ``(n_pooled, n_genes)``; the expression as :meth:`cell_expression` gives it.
        """
        return self._outputs(batch)[:3]

    def _outputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`outputs` and the pooled embeddings ``z`` ``(n_bags, n_genes, dim)``."""
        h = self.encode(batch)
        bag = batch.pooled_bag
        h_pooled = h[batch.pool]
        logits, lse, z = self.attend(h_pooled, bag, batch.n_bags)
        y, att = self.readout(z, batch.size), torch.exp(logits - lse[bag])
        return y, att, self.cell_expression(h_pooled, att, y, bag, batch.size), z

    def aux_output(self, z: torch.Tensor) -> torch.Tensor:
        """The auxiliary target's prediction ``(n_bags, aux_dim)`` from the pooled embeddings ``z`` (:meth:`attend`).

        A linear head on the mean over genes of the gene-pooled embeddings (LayerNorm first): the spot's summary
        that every gene's pooling contributes to, so the auxiliary loss shapes the shared encoder and the queries.
        """
        return self.aux_head(self.aux_norm(z.mean(1)))

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions of the bags ``(n_bags, n_genes)`` and the expression of the pooled cells (:meth:`outputs`)."""
        y, _, cell_expr = self.outputs(batch)
        return y, cell_expr

    def loss(
        self, batch: Batch, target: torch.Tensor, aux: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MSE of the bags plus ``cluster_weight`` times the paper's cluster loss on the cells (Eq. 12).

        With an auxiliary head (``aux_dim``) and ``aux``, the bags' z-scored auxiliary targets ``(n_bags, aux_dim)``,
        plus ``aux_weight`` times the MSE of :meth:`aux_output` (the history's ``"aux"``).
        """
        y, _, cell_expr, z = self._outputs(batch)
        mse = F.mse_loss(y, target)
        cw = self.arch.cluster_weight
        cl = cluster_loss(cell_expr, batch.phenotype[batch.pool]) if cw > 0 else y.new_zeros(())
        total, parts = mse + cw * cl, {"mse": mse, "cluster": cl}
        if aux is not None and self.arch.aux_dim:
            parts["aux"] = F.mse_loss(self.aux_output(z), aux)
            total = total + self.arch.aux_weight * parts["aux"]
        return total, parts

    def _parts(self, bags: Sequence[Sequence[Seq]], tokens_per_batch: int) -> list[list[tuple[int, Seq]]]:
        return token_groups([(b, s) for b, bag in enumerate(bags) for s in bag], tokens_per_batch)

    def n_batches(self, bags: Sequence[Sequence[Seq]], tokens_per_batch: int) -> int:
        """How many batches :meth:`predict_bags` runs."""
        return len(self._parts(bags, tokens_per_batch))

    def predict_bags(
        self,
        bags: Sequence[Sequence[Seq]],
        cells: CellData,
        *,
        tokens_per_batch: int,
        cell_scale: Callable[[np.ndarray], np.ndarray] | None = None,
        cell_rows: np.ndarray | None = None,
        cell_out: np.ndarray | None = None,
        progress: Any = None,
    ) -> np.ndarray:
        """The bags' predictions, each sequence encoded on its own and a bag's pooling combined over its sequences.

        The combination is exact (:func:`combine_parts`), so memory is bounded by ``tokens_per_batch`` whatever the
        bag size (a slide), and a bag's result does not depend on how sequences are packed. With ``cell_scale``,
        each pooled cell ``i`` of a bag ``b`` adds its value on the target scale to ``cell_out[cell_rows[i]]``:
        with the ``"cell"`` readout its own readout at the training's mean bag size (so it does not depend on how
        many cells share the bag); otherwise ``n_b * A[g, i] * y[b, g]``, its attention relative to an equal share
        of the bag's ``n_b`` pooled cells times the bag's prediction, whose plain mean is the bag's prediction.
        """
        from bitro.tl._bags import collate, log_cell_count

        groups = self._parts(bags, tokens_per_batch)
        last_group = {b: gi for gi, group in enumerate(groups) for b, _ in group}
        n_pool = np.array([sum(s.n_pool for s in bag) for bag in bags], dtype=np.float32)
        device = next(self.parameters()).device
        sizes = torch.tensor([log_cell_count(bag) for bag in bags], dtype=torch.float32, device=device)
        y_out = np.zeros((len(bags), self.arch.n_genes))
        own_cells = self.arch.readout == "cell"
        pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        tokens: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # bag -> [(cell rows, values or logits)]
        with torch.no_grad():
            for gi, group in enumerate(groups):
                batch = collate([[s] for _, s in group], cells).to(device)
                h = self.encode(batch)
                logits, lse, z = self.attend(h[batch.pool], batch.pooled_bag, batch.n_bags)
                uniq, local = np.unique(np.array([b for b, _ in group]), return_inverse=True)
                lse_b, z_b = combine_parts(lse, z, torch.as_tensor(local, device=device), len(uniq))
                if cell_scale is not None:
                    token_bag = torch.as_tensor(local, device=device)[batch.pooled_bag]
                    rows = batch.cell[batch.pool]
                    own = self.cell_readout(h[batch.pool]) if own_cells else logits
                for j, b in enumerate(uniq):
                    cur = (lse_b[j : j + 1], z_b[j : j + 1])
                    if b in pending:
                        prev = pending.pop(b)
                        both = torch.zeros(2, dtype=torch.long, device=device)
                        cur = combine_parts(torch.cat([prev[0], cur[0]]), torch.cat([prev[1], cur[1]]), both, 1)
                    if cell_scale is not None:
                        mine = token_bag == j
                        tokens.setdefault(b, []).append((rows[mine].cpu(), own[mine].cpu()))
                    if last_group[b] != gi:
                        pending[b] = cur
                        continue
                    yz = self.retrieve(self.readout(cur[1], sizes[b : b + 1]))[0].cpu().numpy()
                    y_out[b] = yz
                    if cell_scale is not None:
                        r = cell_rows[torch.cat([t[0] for t in tokens[b]]).numpy()]
                        own_b = torch.cat([t[1] for t in tokens.pop(b)])
                        if own_cells:  # the cells' own readout, at the training's mean bag size (no retrieval)
                            cell_out[r] += cell_scale(own_b.numpy()).astype(np.float32)
                        else:  # attention relative to an equal share, times the bag's prediction
                            att = torch.exp(own_b - cur[0][0].cpu()).numpy()
                            cell_out[r] += n_pool[b] * att * cell_scale(yz[None])[0].astype(np.float32)
                if progress is not None:
                    progress.update()
        return y_out


def combine_parts(lse: torch.Tensor, z: torch.Tensor, part_bag: torch.Tensor, n_bags: int):
    """Combine the pooling of bags evaluated in parts (chunks) into whole-bag pooling, exactly.

    ``lse`` ``(n_parts, G)`` and ``z`` ``(n_parts, G, d)`` come from :meth:`BitroNet.attend` on the parts;
    ``part_bag`` says which bag each part belongs to. Returns the bags' ``lse`` and ``z``.
    """
    g = lse.shape[1]
    idx = part_bag[:, None].expand(-1, g)
    m = torch.full((n_bags, g), float("-inf"), dtype=lse.dtype, device=lse.device).scatter_reduce(
        0, idx, lse, reduce="amax"
    )
    w = torch.exp(lse - m[part_bag])  # (P, G)
    total = torch.zeros((n_bags, g), dtype=lse.dtype, device=lse.device).index_add(0, part_bag, w)
    zb = torch.zeros((n_bags, *z.shape[1:]), dtype=z.dtype, device=z.device).index_add(0, part_bag, w[:, :, None] * z)
    return m + torch.log(total), zb / total[:, :, None]


def cluster_loss(cell_expr: torch.Tensor, phenotype: torch.Tensor) -> torch.Tensor:
    """The paper's cluster loss (Eq. 12), normalised to the scale of the MSE.

    ``cell_expr`` ``(n_pooled, G)``: each pooled cell's expression on the scale of the (z-scored) bag targets
    (:meth:`BitroNet.cell_expression`: the paper's pseudo-cells ``A[g, i] * y[g]`` times the bag's number of pooled
    cells, or the ``"cell"`` readout). The loss is the mean squared distance of each cell's expression to the mean of
    its phenotype cluster in the batch. Cells with an unknown phenotype (-1) are left out.
    """
    keep = phenotype >= 0
    if not keep.any():
        return cell_expr.new_zeros(())
    cell_expr, ph = cell_expr[keep], phenotype[keep]
    k = int(ph.max()) + 1
    counts = torch.bincount(ph, minlength=k).to(cell_expr.dtype)
    means = torch.zeros((k, cell_expr.shape[1]), dtype=cell_expr.dtype, device=cell_expr.device).index_add(0, ph, cell_expr)
    means = means / counts.clamp(min=1)[:, None]
    return ((cell_expr - means[ph]) ** 2).mean()
