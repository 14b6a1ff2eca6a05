"""CMRCNet (Liu et al. 2025): image-expression contrastive alignment with masked cross-modal reconstruction.

Reimplemented from the description in ``SEED_SYSTEMS.md`` §2 (no code of the public repository is used). The network
reads a patch table (``bt.pp.spot_patches``), like :mod:`bitro.tl.models._m2ort`:

- image branch: a spot's tokens -> ``token_proj`` (pixel blocks: a linear patch embedding, ViT-B/32's when the
  blocks are 32 px, then ``encoder_depth`` ViT blocks with a cls token; encoder tokens: LayerNorm + Linear and a
  mean token) -> ``E_img = image_head(mean over tokens)``;
- expression branch: the spot's z-scored expression -> ``E_spot = gene_head(expression)``;
- loss: BLEEP's soft-target contrastive loss between ``E_img`` and ``E_spot``, plus the reconstruction of ``E_img``
  from the image tokens, masked element-wise, attending to 8 gene tokens (an SNN of the expression) through a
  cross-attention and the fusion block; ``mean(log(1 + L_con)) + log(1 + L_rec)``;
- prediction: retrieval (the mean expression of the ``k`` training spots whose expression embedding is most similar
  to the spot's image embedding; the training spots' expression is the ``bank`` buffer, saved with the weights),
  or a linear regression head on ``E_img``.

Only imported from inside :mod:`bitro.tl` functions (it imports torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitro.tl.models._base import Batch, CellBagNetwork, fit_bank
from bitro.tl.models._m2ort import PatchArchitecture, _heads, _merge, dihedral, masked_mean, patch_grid

#: The variants' sizes: ``"published"`` (the from-scratch ViT-B/32-shaped image encoder of depth 8, and the fusion
#: block applied twice) and ``"cpu"`` (256-wide tokens, one fusion block, and no encoder layers on encoder tokens /
#: 2 on pixel blocks; SEED_SYSTEMS §2.6).
CMRCNET_VARIANTS: dict[str, dict[str, int]] = {
    "cpu": {"token_dim": 256, "encoder_depth": 0, "encoder_heads": 4, "fusion_depth": 1},
    "published": {"token_dim": 768, "encoder_depth": 8, "encoder_heads": 8, "fusion_depth": 2},
}
#: Encoder layers of the ``"cpu"`` variant on pixel tables (a linear patch embedding alone sees no context).
CPU_PIXEL_ENCODER_DEPTH = 2
#: ``"retrieval"``: the mean expression of the top-``k`` training spots; ``"regression"``: a linear head on ``E_img``.
PREDICT_MODES: tuple[str, ...] = ("retrieval", "regression")
#: ``"first"``: the level-1 block of each token only (the published single 224-px patch); ``"all"``: all levels.
LEVEL_MODES: tuple[str, ...] = ("first", "all")
#: Fixed sizes of the published network: heads of the gene-token cross-attention and of the fusion block.
CROSS_HEADS, FUSION_HEADS = 4, 8
#: The published dropout rates: projection heads, fusion block, its cross-attention's inputs, the gene SNN.
HEAD_DROPOUT, FUSION_DROPOUT, CROSS_DROPOUT, SNN_DROPOUT = 0.1, 0.1, 0.25, 0.25
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class CMRCNetArchitecture(PatchArchitecture):
    """Hyper-parameters of :class:`CMRCNet` and of its loss (stored in the model's JSON config).

    Parameters
    ----------
    variant
        ``"cpu"`` (default: 256-wide tokens, one fusion block, no encoder layers on encoder tokens, 2 on pixels) or
        ``"published"`` (768-wide tokens, a depth-8 ViT encoder with 8 heads, the fusion block applied twice).
    token_dim, encoder_depth, encoder_heads, fusion_depth
        Width of the image tokens, ViT layers on them (0: none; the tokens are then summarised by their mean token),
        their heads, and how often the fusion block is applied; ``None`` takes the variant's.
    projection_dim
        Width of the embeddings ``E_img``, ``E_spot`` and of the reconstruction (256; divisible by 8).
    gene_tokens
        Number of gene tokens the SNN makes of a spot's expression (8).
    levels
        ``"first"`` (the level-1 block or token of each grid cell: the published single patch) or ``"all"``.
    mask_ratio
        Share of the image-token entries zeroed before the reconstruction (0.5), in [0, 1).
    temperature
        τ of the contrastive loss (1.0).
    fix_temperature_quirk
        False (the public code): the soft targets are ``softmax(similarity * τ)``; True: ``/ τ``, as meant.
    tied_fusion
        True (the public code): one fusion block applied ``fusion_depth`` times; False: that many blocks.
    detach_target
        False (the public code): the reconstruction target ``E_img`` carries gradients; True: detached.
    predict
        ``"retrieval"`` (default) or ``"regression"`` (a linear head on ``E_img`` trained with an added MSE term of
        weight ``regression_weight``).
    k
        Training spots averaged by the retrieval (50; at most the bank's size).
    augment
        Train on a random dihedral turn / flip of each patch (pixel blocks turn with the grid; encoder tokens only
        move, which changes nothing without encoder layers).
    """

    token_dim: int | None = None
    encoder_depth: int | None = None
    encoder_heads: int | None = None
    fusion_depth: int | None = None
    projection_dim: int = 256
    gene_tokens: int = 8
    levels: str = "first"
    mask_ratio: float = 0.5
    temperature: float = 1.0
    fix_temperature_quirk: bool = False
    tied_fusion: bool = True
    detach_target: bool = False
    predict: str = "retrieval"
    k: int = 50
    regression_weight: float = 1.0
    augment: bool = True

    model_name = "cmrcnet"
    variants = CMRCNET_VARIANTS

    def variant_values(self) -> dict[str, int]:
        """The variant's sizes (the ``"cpu"`` variant has encoder layers on pixel tables)."""
        values = super().variant_values()
        if self.variant == "cpu" and self.kind == "pixels":
            values["encoder_depth"] = CPU_PIXEL_ENCODER_DEPTH
        return values

    def validate(self) -> None:
        """Sizes, rates and modes in range."""
        super().validate()
        if self.projection_dim < FUSION_HEADS or self.projection_dim % FUSION_HEADS:
            msg = f"`projection_dim` must be a positive multiple of {FUSION_HEADS}, got {self.projection_dim!r}."
            raise ValueError(msg)
        if self.gene_tokens < 1 or self.k < 1:
            msg = f"`gene_tokens` and `k` must be at least 1, got {self.gene_tokens!r} and {self.k!r}."
            raise ValueError(msg)
        if self.encoder_depth and self.token_dim % self.encoder_heads:
            msg = (
                f"`token_dim` ({self.token_dim}) must be divisible by `encoder_heads` ({self.encoder_heads}); "
                f"e.g. token_dim={self.encoder_heads * 32}."
            )
            raise ValueError(msg)
        if not 0 <= self.mask_ratio < 1:
            msg = f"`mask_ratio` must be in [0, 1) (the share of image-token entries zeroed), got {self.mask_ratio!r}."
            raise ValueError(msg)
        if self.temperature <= 0 or self.regression_weight < 0:
            msg = (
                f"`temperature` must be > 0 and `regression_weight` >= 0, got {self.temperature!r} and "
                f"{self.regression_weight!r}."
            )
            raise ValueError(msg)
        if self.predict not in PREDICT_MODES:
            msg = f"predict={self.predict!r} is not supported; use one of {PREDICT_MODES}."
            raise ValueError(msg)
        if self.levels not in LEVEL_MODES:
            msg = f"levels={self.levels!r} is not supported; use one of {LEVEL_MODES}."
            raise ValueError(msg)


class ProjectionHead(nn.Module):
    """BLEEP's projection head: ``p = Linear(in, out)``; ``LayerNorm(Dropout(Linear(GELU(p))) + p)``."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = HEAD_DROPOUT):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``(..., in_dim)`` to ``(..., out_dim)``."""
        p = self.projection(x)
        return self.norm(self.drop(self.fc(F.gelu(p))) + p)


class ViTBlock(nn.Module):
    """Pre-norm ViT block: ``x += proj(attention(LN x))``; ``x += fc2(GELU(fc1(LN x)))`` (MLP ratio 4, qkv bias).

    Keys where ``mask`` is False (missing tokens) are ignored.
    """

    def __init__(self, dim: int, heads: int, *, eps: float = 1e-6, drop: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Update ``x`` ``(n, length, dim)``; ``mask`` ``(n, length)``."""
        q, k, v = (_heads(t, self.heads) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.drop(self.proj(_merge(att)))
        return x + self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.norm2(x))))))


class FusionBlock(nn.Module):
    """The fusion block of the reconstruction: a ViT block on the image tokens, then their attention to the genes.

    ``Q = Drop(ReLU(q(x)))``, ``K = Drop(ReLU(k(y)))``, ``x += v1(Q) + softmax(Q Kᵀ / √d) v2(K)`` (8 heads; ``y``:
    the gene tokens, passed on unchanged).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.block = ViTBlock(dim, FUSION_HEADS, eps=1e-5, drop=FUSION_DROPOUT)
        self.q, self.k, self.v1, self.v2 = (nn.Linear(dim, dim) for _ in range(4))
        self.drop = nn.Dropout(CROSS_DROPOUT)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Update the image tokens ``x`` ``(n, length, dim)`` with the gene tokens ``y`` ``(n, n_gene_tokens, dim)``."""
        x = self.block(x, mask)
        q = self.drop(F.relu(self.q(x)))
        k = self.drop(F.relu(self.k(y)))
        att = F.scaled_dot_product_attention(
            _heads(q, FUSION_HEADS), _heads(k, FUSION_HEADS), _heads(self.v2(k), FUSION_HEADS)
        )
        return x + self.v1(q) + _merge(att)


def bleep_loss(e_img: torch.Tensor, e_spot: torch.Tensor, temperature: float, fix_quirk: bool) -> torch.Tensor:
    """BLEEP's soft-target contrastive loss of each spot ``(n,)``.

    ``logits = E_spot E_imgᵀ / τ``, soft targets ``softmax((E_img E_imgᵀ + E_spot E_spotᵀ) / 2 * τ)`` (``/ τ`` with
    ``fix_quirk``), the mean of the cross-entropies of the rows and of the columns.
    """
    logits = e_spot @ e_img.T / temperature
    similarity = (e_img @ e_img.T + e_spot @ e_spot.T) / 2
    targets = F.softmax(similarity / temperature if fix_quirk else similarity * temperature, dim=-1)
    spots = -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
    images = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(-1)
    return (spots + images) / 2


class CMRCNet(CellBagNetwork):
    """The CMRCNet network on a patch table: contrastive image / expression embeddings, retrieval prediction.

    The retrieval bank (buffer ``bank``, ``(n_train, n_genes)``) is the training spots' z-scored expression, stored
    by :meth:`prepare` (called by :func:`bitro.tl.fit`) and saved with the weights; a fresh network's is empty. Its
    embeddings are computed when needed and cached in evaluation mode (until :meth:`train` or a state dict load).

    Parameters
    ----------
    arch
        The :class:`CMRCNetArchitecture`, made for a patch table by :meth:`CMRCNetArchitecture.for_data`.
    """

    architecture_class = CMRCNetArchitecture
    gene_params = ("regression_head.weight", "regression_head.bias")

    def __init__(self, arch: CMRCNetArchitecture):
        super().__init__(arch)
        arch.check_layout()
        d, p, g = arch.token_dim, arch.projection_dim, arch.n_genes
        in_dim = arch.level_dims[0] if arch.levels == "first" else arch.n_features
        pixels = arch.kind == "pixels"
        if pixels:  # ImageNet normalisation of each value by its channel (blocks are flattened (y, x, channel))
            channel = torch.arange(in_dim) % 3
            self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN)[channel], persistent=False)
            self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD)[channel], persistent=False)
        self.token_norm = nn.Identity() if pixels else nn.LayerNorm(in_dim)
        self.token_proj = nn.Linear(in_dim, d)
        if arch.encoder_depth:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.pos_embedding = nn.Parameter(torch.randn(1, arch.grid**2 + 1, d) * 0.02)
            self.encoder = nn.ModuleList(ViTBlock(d, arch.encoder_heads) for _ in range(arch.encoder_depth))
            self.encoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.image_head = ProjectionHead(d, p)
        self.gene_head = ProjectionHead(g, p)
        self.rec_proj = nn.Linear(d, p)
        self.snn = nn.Sequential(nn.Linear(g, arch.gene_tokens * p), nn.ELU(), nn.AlphaDropout(SNN_DROPOUT))
        nn.init.normal_(self.snn[0].weight, std=1 / math.sqrt(g))
        nn.init.zeros_(self.snn[0].bias)
        self.cross = nn.MultiheadAttention(p, CROSS_HEADS, batch_first=True)
        n_fusion = 1 if arch.tied_fusion else arch.fusion_depth
        self.fusion = nn.ModuleList(FusionBlock(p) for _ in range(n_fusion if arch.fusion_depth else 0))
        if arch.predict == "regression":
            self.regression_head = nn.Linear(p, g)
        self.register_buffer("bank", torch.zeros(0, g))
        self._keys: torch.Tensor | None = None

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The layers :func:`bitro.tl.transfer` puts LoRA adapters on by default: token projection, ViT layers."""
        vit = ("qkv", "proj", "fc1", "fc2") if self.arch.encoder_depth or self.arch.fusion_depth else ()
        return ("token_proj", *vit)

    # -- the retrieval bank --------------------------------------------------------------------------------------
    def prepare(self, target: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Store the training spots' z-scored expression ``(n_train, n_genes)`` as the retrieval bank.

        ``reference`` (other sections' expression) is not used: the bank holds the spots trained on, as published.
        """
        if target.ndim != 2 or target.shape[1] != self.arch.n_genes:
            msg = f"The retrieval bank must be (spots x {self.arch.n_genes} genes), got shape {tuple(target.shape)}."
            raise ValueError(msg)
        self.bank = target.detach().to(device=self.bank.device, dtype=self.bank.dtype).clone()
        self._keys = None

    def train(self, mode: bool = True) -> CMRCNet:
        """Set the training mode (and forget the cached bank embeddings, as the weights may change)."""
        self._keys = None
        return super().train(mode)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        fit_bank(self, state_dict, prefix)
        self._keys = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def bank_keys(self) -> torch.Tensor:
        """The L2-normalised expression embeddings of the bank ``(n_train, projection_dim)`` (cached in eval mode)."""
        keys = self._keys
        if keys is not None and keys.device == self.bank.device and not self.training:
            return keys
        was = self.gene_head.training
        self.gene_head.eval()
        with torch.no_grad():
            keys = F.normalize(self.gene_head(self.bank), dim=-1)
        self.gene_head.train(was)
        if not self.training:
            self._keys = keys
        return keys

    def retrieve(self, e_img: torch.Tensor) -> torch.Tensor:
        """The mean bank expression of each image embedding's ``k`` most cosine-similar bank spots ``(n, n_genes)``."""
        n = self.bank.shape[0]
        if n == 0:
            msg = (
                "CMRCNet predicts by retrieval, but the retrieval bank is empty: the network was not trained with "
                "bitro.tl.fit (which stores the training spots' expression in it); train it, or load a trained "
                "network's weights."
            )
            raise ValueError(msg)
        similarity = F.normalize(e_img, dim=-1) @ self.bank_keys().T
        idx = similarity.topk(min(self.arch.k, n), dim=1).indices
        return self.bank[idx].mean(1)

    # -- the image and expression branches -----------------------------------------------------------------------
    def tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The spots' image tokens ``(n_bags, 1 + grid**2, token_dim)`` (cls or mean token first) and their mask."""
        arch = self.arch
        x, mask = patch_grid(batch, arch.grid, arch.token_um)
        if self.training and arch.augment and (arch.kind == "pixels" or arch.encoder_depth):  # else nothing sees it
            x, mask = dihedral(x, mask, arch.grid, arch.blocks, torch.randint(0, 8, (x.shape[0],), device=x.device))
        if arch.levels == "first":
            x = x[..., : arch.level_dims[0]]
        x = x.to(self.token_proj.weight.dtype)
        if arch.kind == "pixels":
            x = (x / 255.0 - self.pixel_mean) / self.pixel_std
        t = self.token_proj(self.token_norm(x))
        n = t.shape[0]
        first = mask.new_ones((n, 1))
        if arch.encoder_depth:
            t = torch.cat([self.cls_token.expand(n, -1, -1), t], dim=1) + self.pos_embedding
            mask = torch.cat([first, mask], dim=1)
            for block in self.encoder:
                t = block(t, mask)
            return self.encoder_norm(t), mask
        return torch.cat([masked_mean(t, mask)[:, None], t], dim=1), torch.cat([first, mask], dim=1)

    def image_embedding(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``E_img`` ``(n, projection_dim)``: the image head on the mean of the present tokens."""
        return self.image_head(masked_mean(tokens, mask))

    def reconstruct(self, tokens: torch.Tensor, mask: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``E_img`` ``(n, projection_dim)`` from masked image tokens and the gene tokens."""
        arch = self.arch
        z = self.rec_proj(tokens)
        z = z * (torch.rand_like(z) >= arch.mask_ratio)  # element-wise, no mask token, no rescaling
        genes = self.snn(expression).view(len(expression), arch.gene_tokens, arch.projection_dim)
        z, _ = self.cross(z, genes, genes, need_weights=False)
        for i in range(arch.fusion_depth):
            z = self.fusion[0 if arch.tied_fusion else i](z, genes, mask)
        return masked_mean(z, mask)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The spots' predictions ``(n_bags, n_genes)`` (z-scores; retrieval or regression), and each token's."""
        e_img = self.image_embedding(*self.tokens(batch))
        y = self.regression_head(e_img) if self.arch.predict == "regression" else self.retrieve(e_img)
        return y, y[batch.pooled_bag]

    def loss(self, batch: Batch, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``mean(log(1 + L_con)) + log(1 + L_rec)`` (plus ``regression_weight`` times the MSE of the head).

        ``target``: the spots' z-scored expression ``(n_bags, n_genes)``, the input of the expression branch.
        """
        arch = self.arch
        tokens, mask = self.tokens(batch)
        e_img = self.image_embedding(tokens, mask)
        con = bleep_loss(e_img, self.gene_head(target), arch.temperature, arch.fix_temperature_quirk)
        rec = F.mse_loss(self.reconstruct(tokens, mask, target), e_img.detach() if arch.detach_target else e_img)
        total = torch.log1p(con).mean() + torch.log1p(rec)
        parts = {"contrastive": con.mean(), "reconstruction": rec}
        if arch.predict == "regression":
            parts["mse"] = F.mse_loss(self.regression_head(e_img), target)
            total = total + arch.regression_weight * parts["mse"]
        return total, parts
