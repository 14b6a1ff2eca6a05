"""An ST-guided image encoder (TPIR's second stage): spot image features aligned to an expression embedding.

:func:`spot_image_features` pools the frozen EfficientNet-Lite0 tokens of :func:`bitro.pp.spot_patches` into one
vector per spot. :func:`align_images` trains two small projection heads (BLEEP's: linear, GELU, linear, dropout,
residual, layer norm), one on the image features and one on the frozen expression embedding (the latent of
:func:`bitro.tl.expression_encoder`, or a PCA of log1p expression as the uncorrected baseline), so that a spot's
two views are close: symmetric InfoNCE (CLIP, ``loss="clip"``) or BLEEP's soft targets from the similarities
within each modality (``loss="bleep"``). The image head then embeds spots of any slide (:meth:`ImageAligner.embed`).
:meth:`ImageAligner.save` writes both heads and the standardisation (safetensors) and the settings (JSON), no
pickle; :func:`load_image_aligner` reads them back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from bitro._checks import check_anndata, check_int, check_number
from bitro._constants import Key
from bitro._logging import logger
from bitro._settings import settings

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

LOSSES = ("clip", "bleep")
#: ``format`` of the saved config, checked when loading.
FORMAT = "bitro.image_aligner/1"


def spot_image_features(
    data: SpatialData,
    *,
    patches_key: str = Key.PATCHES_TABLE,
    table_key: str = Key.SPOTS_TABLE,
    key_added: str = Key.IMAGE_FEATURES,
) -> np.ndarray:
    """One image feature vector per spot: the mean of its EfficientNet-Lite0 tokens, level by level.

    Parameters
    ----------
    data
        SpatialData with the spot table and the patch table of :func:`bitro.pp.spot_patches` run with
        ``encoder="efficientnet"``.
    patches_key
        The patch table.
    table_key
        The spot table; written to.
    key_added
        Written to ``data[table_key].obsm[key_added]``; spots without a patch (``outside="drop"``) get NaN.

    Returns
    -------
    Spots x (1280 x levels), float32.
    """
    from spatialdata import SpatialData

    from bitro._utils import check_key

    if not isinstance(data, SpatialData):
        msg = f"`data` must be a SpatialData with the spot table and the patch table, got {type(data).__name__}."
        raise TypeError(msg)
    check_key(data.tables, table_key, "Spot table")
    check_key(data.tables, patches_key, "Patch table (`bt.pp.spot_patches(..., encoder='efficientnet')`)")
    patches, spots = data.tables[patches_key], data.tables[table_key]
    record = patches.uns.get(Key.UNS, {}).get(Key.SPOT_PATCHES, {})
    if record.get("encoder") != "efficientnet":
        msg = (
            f"Patch table {patches_key!r} holds {record.get('encoder', 'unknown')!r} tokens; spot image features need "
            "EfficientNet tokens: run `bt.pp.spot_patches(sdata, encoder='efficientnet', key_added=...)`."
        )
        raise ValueError(msg)
    g2 = int(record["grid"]) ** 2
    tokens = np.asarray(patches.obsm[Key.PATCHES], dtype=np.float32)
    pooled = tokens.reshape(-1, g2, tokens.shape[1]).mean(axis=1)
    keys = (
        patches.obs[Key.SAMPLE].astype(str).to_numpy()[::g2]
        + "\0"
        + patches.obs[Key.SPOT_ID].astype(str).to_numpy()[::g2]
    )
    ids = spots.obs[Key.SPOT_ID].astype(str) if Key.SPOT_ID in spots.obs else spots.obs_names.astype(str)
    wanted = spots.obs[Key.SAMPLE].astype(str).to_numpy() + "\0" + np.asarray(ids, dtype=str)
    import pandas as pd

    found = pd.Index(keys).get_indexer(wanted)
    out = np.full((spots.n_obs, pooled.shape[1]), np.nan, dtype=np.float32)
    out[found >= 0] = pooled[found[found >= 0]]
    if (found < 0).any():
        logger.warning(
            "%d spots have no patch in %r; their image features are NaN.", int((found < 0).sum()), patches_key
        )
    spots.obsm[key_added] = out
    return out


def _matrix(adata: AnnData, key: str, arg: str, name: str) -> np.ndarray:
    if key not in adata.obsm:
        msg = f"`{arg}={key!r}` is not in `{name}.obsm` (keys: {sorted(adata.obsm) or 'none'})."
        raise KeyError(msg)
    x = np.asarray(adata.obsm[key], dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        msg = f"`{name}.obsm[{key!r}]` must be a spots x features matrix, got shape {x.shape}."
        raise ValueError(msg)
    if not np.isfinite(x).all():
        msg = (
            f"`{name}.obsm[{key!r}]` holds NaN or infinite values in {int((~np.isfinite(x)).any(1).sum())} spots; "
            "leave those spots out (e.g. spots without a patch)."
        )
        raise ValueError(msg)
    return x


def _head(n_in: int, dim: int, dropout: float) -> Any:
    """BLEEP's projection head: linear, GELU, linear, dropout, residual, layer norm."""
    import torch
    from torch import nn

    class ProjectionHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.projection = nn.Linear(n_in, dim)
            self.fc = nn.Linear(dim, dim)
            self.dropout = nn.Dropout(dropout)
            self.norm = nn.LayerNorm(dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = self.projection(x)
            return self.norm(p + self.dropout(self.fc(nn.functional.gelu(p))))

    return ProjectionHead()


def contrastive_loss(image: Any, gene: Any, scale: Any, loss: str) -> Any:
    """Symmetric InfoNCE (``"clip"``) or BLEEP's soft-target loss of L2-normalised embeddings; ``scale`` = 1 / tau."""
    import torch
    import torch.nn.functional as F

    image, gene = F.normalize(image, dim=1), F.normalize(gene, dim=1)
    logits = scale * image @ gene.T
    if loss == "clip":
        target = torch.arange(len(image), device=image.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    # BLEEP: targets from the similarities within each modality, averaged
    soft = F.softmax(scale * (image @ image.T + gene @ gene.T) / 2, dim=1).detach()
    return (
        (-soft * F.log_softmax(logits, dim=1)).sum(1).mean() + (-soft.T * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    ) / 2


class ImageAligner:
    """Projection of spot image features into the space shared with expression (returned by :func:`align_images`).

    Attributes
    ----------
    config
        The settings it was trained with.
    history
        Mean training loss per epoch.
    """

    def __init__(
        self, image_head: Any, gene_head: Any, mean: np.ndarray, std: np.ndarray, config: dict, history: list
    ) -> None:
        self.image_head = image_head
        self.gene_head = gene_head
        self.mean, self.std = mean, std
        self.config = config
        self.history = history

    def __repr__(self) -> str:
        c = self.config
        return f"ImageAligner(loss={c['loss']!r}, {c['n_image_features']} image features -> {c['dim']}, {c['epochs']} epochs)"

    def embed(
        self, adata: AnnData, *, image_rep: str | None = None, key_added: str | None = Key.IMAGE_EMBEDDING
    ) -> np.ndarray:
        """The aligned image embedding of every spot (no expression needed).

        Parameters
        ----------
        adata
            Spots with their image features in ``.obsm[image_rep]``.
        image_rep
            By default the key the aligner was trained on.
        key_added
            Also write the embedding to ``adata.obsm[key_added]``; None writes nothing.

        Returns
        -------
        Spots x ``dim``.
        """
        import torch

        check_anndata(adata, "`adata`", "pass the spot table with the image features in .obsm")
        image_rep = self.config["image_rep"] if image_rep is None else image_rep
        x = _matrix(adata, image_rep, "image_rep", "adata")
        if x.shape[1] != self.config["n_image_features"]:
            msg = (
                f"`adata.obsm[{image_rep!r}]` has {x.shape[1]} features; the aligner was trained on "
                f"{self.config['n_image_features']} (compute them the same way, `bt.tl.spot_image_features`)."
            )
            raise ValueError(msg)
        self.image_head.eval()
        with torch.no_grad():
            z = self.image_head(torch.from_numpy((x - self.mean) / self.std)).numpy()
        if key_added is not None:
            adata.obsm[key_added] = z
        return z

    def save(self, path: str | Path) -> Path:
        """Write the aligner to the folder ``path``: ``config.json`` and ``weights.safetensors`` (no pickle).

        Both projection heads (``image_head.*``, ``gene_head.*``) and the image features' standardisation
        (``image_mean``, ``image_std``) go to the safetensors file, the settings and the loss history to the JSON
        config. The folder is written aside and swapped in once complete; read it back with
        :func:`load_image_aligner`.

        Parameters
        ----------
        path
            The folder; replaced when it exists.

        Returns
        -------
        The folder.
        """
        from bitro.tl._saved import write_saved

        state = {f"image_head.{k}": v for k, v in self.image_head.state_dict().items()}
        state |= {f"gene_head.{k}": v for k, v in self.gene_head.state_dict().items()}
        arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in state.items()}
        arrays["image_mean"] = np.ascontiguousarray(self.mean, dtype=np.float32)
        arrays["image_std"] = np.ascontiguousarray(self.std, dtype=np.float32)
        config = {**self.config, "history": [float(v) for v in self.history]}
        return write_saved(Path(path), arrays, config, FORMAT, "ImageAligner.save")


def load_image_aligner(path: str | Path) -> ImageAligner:
    """Read an image aligner written by :meth:`ImageAligner.save`.

    Parameters
    ----------
    path
        The folder with ``config.json`` and ``weights.safetensors``.

    Returns
    -------
    The aligner, in evaluation mode; :meth:`ImageAligner.embed` gives exactly the saved one's embedding.

    Examples
    --------
    >>> import bitro as bt
    >>> aligner = bt.tl.load_image_aligner("image_aligner")  # doctest: +SKIP
    >>> aligner.embed(new_spots)  # doctest: +SKIP
    """
    import torch

    from bitro.tl._saved import read_saved

    folder = Path(path)
    config, arrays = read_saved(folder, "image aligner", FORMAT, "ImageAligner.save")
    history = config.pop("history", [])
    try:
        n_in, n_expr = int(config["n_image_features"]), int(config["n_expression_features"])
        dim, dropout = int(config["dim"]), float(config["dropout"])
        mean, std = arrays.pop("image_mean"), arrays.pop("image_std")
        image_head, gene_head = _head(n_in, dim, dropout), _head(n_expr, dim, dropout)
        for prefix, head in (("image_head.", image_head), ("gene_head.", gene_head)):
            head.load_state_dict(
                {k[len(prefix) :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(prefix)}
            )
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        msg = (
            f"{str(folder)!r} holds an incomplete or inconsistent image aligner ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); save it again."
        )
        raise ValueError(msg) from None
    if mean.shape != (n_in,) or std.shape != (n_in,):
        msg = f"{str(folder)!r}: the image standardisation has the wrong shape for {n_in} features; save it again."
        raise ValueError(msg)
    image_head.eval()
    gene_head.eval()
    return ImageAligner(image_head, gene_head, mean.astype(np.float32), std.astype(np.float32), config, history)


def align_images(
    adata: AnnData,
    *,
    image_rep: str = Key.IMAGE_FEATURES,
    expression_rep: str = Key.EXPRESSION_LATENT,
    loss: Literal["clip", "bleep"] = "clip",
    dim: int = 256,
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    temperature: float = 0.07,
    dropout: float = 0.1,
    seed: int = 0,
) -> ImageAligner:
    """Align spot image features to a frozen expression embedding by contrastive learning (TPIR's second stage).

    Both sides get a trainable projection head (BLEEP's); the features themselves stay frozen. ``loss="clip"``:
    symmetric InfoNCE on L2-normalised embeddings with a learnable temperature (CLIP); ``loss="bleep"``: the same
    logits against soft targets, the softmax of the mean of the image-image and expression-expression similarities
    (BLEEP, Xie et al. 2023), with the temperature fixed. Image features are standardised with the training
    spots' mean and standard deviation.

    Parameters
    ----------
    adata
        Training spots, with image features and the expression embedding in ``.obsm``.
    image_rep
        The image features, e.g. :func:`spot_image_features`'s.
    expression_rep
        The expression embedding: the latent of :meth:`ExpressionEncoder.embed` (batch-agnostic), or e.g.
        ``"X_pca"`` of log1p expression (the uncorrected baseline).
    loss
        ``"clip"`` or ``"bleep"``.
    dim
        Width of the shared space.
    epochs, batch_size, lr, weight_decay
        AdamW training.
    temperature
        tau of the softmax (initial value, learnable with ``"clip"``).
    dropout
        Dropout of the heads.
    seed
        Random seed.

    Returns
    -------
    The aligner: :meth:`ImageAligner.embed` writes the embedding of any spots' image features.

    Examples
    --------
    >>> import bitro as bt
    >>> aligner = bt.tl.align_images(spots, loss="bleep")  # doctest: +SKIP
    >>> aligner.embed(new_spots)  # doctest: +SKIP
    """
    import torch
    from tqdm.auto import tqdm

    check_anndata(adata, "`adata`", "pass the training spots with image features and expression embedding in .obsm")
    if loss not in LOSSES:
        msg = f"`loss={loss!r}` is not one of {', '.join(map(repr, LOSSES))}."
        raise ValueError(msg)
    for name, value in (("dim", dim), ("epochs", epochs), ("batch_size", batch_size)):
        check_int(name, value, minimum=1)
    check_int("seed", seed, minimum=0)
    check_number("lr", lr, low=0, low_open=True)
    check_number("weight_decay", weight_decay, low=0)
    check_number("temperature", temperature, low=0, low_open=True)
    check_number("dropout", dropout, low=0, high=1, high_open=True)
    x = _matrix(adata, image_rep, "image_rep", "adata")
    y = _matrix(adata, expression_rep, "expression_rep", "adata")
    if len(x) < 2:
        msg = "Contrastive learning needs at least 2 spots."
        raise ValueError(msg)
    mean, std = x.mean(0), x.std(0) + 1e-6
    ymean, ystd = y.mean(0), y.std(0) + 1e-6
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy((y - ymean) / ystd)
    torch.manual_seed(seed)
    image_head, gene_head = _head(x.shape[1], dim, dropout), _head(y.shape[1], dim, dropout)
    log_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / temperature))), requires_grad=loss == "clip")
    params = [*image_head.parameters(), *gene_head.parameters(), *([log_scale] if loss == "clip" else [])]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history = []
    image_head.train()
    gene_head.train()
    for _ in tqdm(range(epochs), desc=f"align images ({loss})", disable=not settings.progress):
        order = torch.randperm(len(xt), generator=gen)
        total, n = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            value = contrastive_loss(image_head(xt[idx]), gene_head(yt[idx]), log_scale.exp().clamp(max=100), loss)
            opt.zero_grad()
            value.backward()
            opt.step()
            total, n = total + float(value.detach()) * len(idx), n + len(idx)
        history.append(total / max(n, 1))
    if not np.isfinite(history[-1]):
        from bitro._checks import TrainingDivergedError

        msg = "The contrastive loss became NaN or infinite; lower `lr` or raise `temperature`."
        raise TrainingDivergedError(msg)
    config = {
        "image_rep": image_rep,
        "expression_rep": expression_rep,
        "loss": loss,
        "dim": int(dim),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "temperature": float(1 / log_scale.exp().item()),
        "dropout": float(dropout),
        "seed": int(seed),
        "n_image_features": int(x.shape[1]),
        "n_expression_features": int(y.shape[1]),
        "n_spots": int(len(x)),
    }
    logger.info("Aligned %d spots' image features (%s loss): %.3f -> %.3f.", len(x), loss, history[0], history[-1])
    image_head.eval()
    gene_head.eval()
    return ImageAligner(image_head, gene_head, mean, std, config, history)
