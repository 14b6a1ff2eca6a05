"""What every model trained on bags of cells shares: its architecture record, its batches and its prediction driver.

A model (see :mod:`bitro.tl.models`) is a network class derived from :class:`CellBagNetwork`, built from its
``architecture_class``, a dataclass derived from :class:`Architecture` (its hyper-parameters, stored in the saved
model's JSON config and validated when created or read back). The network must implement
:meth:`CellBagNetwork.forward`; the training loss and the prediction over bags of any size have general versions
here that a model may replace (BiTro does, to pool slides of any size in parts).

Only imported from inside :mod:`bitro.tl` functions (it imports torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bitro.tl._bags import Batch, CellData, Seq, collate


@dataclass
class Architecture:
    """Hyper-parameters of a network: at least its input and output widths. Subclass it with the model's own.

    Every field must be JSON-able (numbers, strings, booleans); :meth:`validate` checks the values and runs when the
    dataclass is made, so a bad option or an edited saved config fails in one sentence before any work.
    """

    n_features: int
    n_genes: int

    #: Fields set from the training data by :meth:`for_data`, not options a user gives.
    data_fields: ClassVar[tuple[str, ...]] = ("n_features", "n_genes")
    #: Options :meth:`for_data` accepts that are not fields (e.g. BiTro's ``heads``, which sets two fields).
    extra_options: ClassVar[tuple[str, ...]] = ()
    #: The table the network reads its tokens from, by default (``cells_key`` of :func:`bitro.tl.fit`): the cell
    #: table of ``bt.pp.extract_cells``, or the patch table of ``bt.pp.spot_patches`` (``"patches"``).
    input_table: ClassVar[str] = "cells"
    #: The tokens' features in that table's ``.obsm`` (``use_rep`` of :func:`bitro.tl.fit`), by default.
    default_rep: ClassVar[str] = "X_bitro"

    def __post_init__(self) -> None:
        from bitro._checks import check_int, is_number

        for f in fields(self):  # annotations are strings here (``from __future__ import annotations``)
            value = getattr(self, f.name)
            if f.type == "int":
                check_int(f.name, value, minimum=1 if f.name.startswith("n_") else 0)
            elif f.type == "bool" and not isinstance(value, bool | np.bool_):
                msg = f"`{f.name}` must be True or False, got {value!r}."
                raise TypeError(msg)
            elif f.type == "float" and not (is_number(value) and np.isfinite(value)):
                msg = f"`{f.name}` must be a finite number, got {value!r}."
                raise TypeError(msg)
            elif f.type == "str" and not isinstance(value, str):
                msg = f"`{f.name}` must be a string, got {value!r}."
                raise TypeError(msg)
        self.validate()

    def validate(self) -> None:
        """Check the values beyond their types (a subclass adds its own rules)."""

    @classmethod
    def for_data(
        cls,
        *,
        n_features: int,
        n_genes: int,
        bag_sizes: Sequence[float],
        features: dict[str, Any] | None = None,
        **options: Any,
    ) -> Architecture:
        """The architecture for the training data and the user's ``options`` (unknown names fail with the valid ones).

        ``n_features`` token features, ``n_genes`` genes, ``bag_sizes`` the training bags' ``log1p`` token counts,
        ``features`` what the token table records of its features (:func:`bitro.tl._bags.feature_config`; a patch
        table's includes its ``"patch_layout"``), ``None`` when only the options are checked.
        """
        cls.check_options(options)
        return cls.from_dict({"n_features": n_features, "n_genes": n_genes, **options})

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Refuse option names that are not the user's to give (unknown ones, or fields set from the data)."""
        allowed = {f.name for f in fields(cls)} - set(cls.data_fields) | set(cls.extra_options)
        unknown = sorted(set(options) - allowed)
        if unknown:
            msg = f"Unknown option{'s' if len(unknown) > 1 else ''} {unknown} for {cls.__name__}; options: {sorted(allowed)}."
            raise TypeError(msg + _owners(unknown))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Architecture:
        """An architecture from a dict of its fields (e.g. a saved config), refusing unknown names."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            msg = f"Unknown field{'s' if len(unknown) > 1 else ''} {unknown} for {cls.__name__}; fields: {sorted(known)}."
            raise TypeError(msg)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)

    @property
    def needs_phenotype(self) -> bool:
        """Whether training reads the cells' phenotypes (``.obs["phenotype"]``)."""
        return False


def _owners(names: list[str]) -> str:
    """``" (x is an option of model='m2ort')"``: which registered models take the options ``names``, if any."""
    from bitro.tl.models import MODELS

    said = []
    for name in names:
        models = []
        for spec in MODELS.values():
            try:
                arch = spec.architecture
            except (ImportError, AttributeError):  # a registered model whose module is missing: not ours to judge
                continue
            if name in {f.name for f in fields(arch)} - set(arch.data_fields) | set(arch.extra_options):
                models.append(spec.name)
        if models:
            said.append(f"{name!r} is an option of model={' / '.join(map(repr, models))}")
    return f" ({'; '.join(said)})" if said else ""


class CellBagNetwork(nn.Module):
    """Base of the networks that predict a bag of cells (a spot, a slide) and each of its pooled cells.

    A subclass sets :attr:`architecture_class` and implements :meth:`forward`.
    """

    #: The dataclass of the network's hyper-parameters.
    architecture_class: ClassVar[type[Architecture]] = Architecture
    #: Parameters with one row per gene (carried over by gene symbol in :func:`bitro.tl.transfer`).
    gene_params: ClassVar[tuple[str, ...]] = ()
    #: Parts of the gene head shared by all genes (module or parameter names): fine-tuning retrains them with
    #: the gene rows (:func:`bitro.tl.transfer`, ``train_genes="all"``).
    shared_head: ClassVar[tuple[str, ...]] = ()

    def __init__(self, arch: Architecture):
        super().__init__()
        if not isinstance(arch, self.architecture_class):
            msg = f"{type(self).__name__} needs a {self.architecture_class.__name__}, got {type(arch).__name__}."
            raise TypeError(msg)
        self.arch = arch

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions of the batch's bags ``(n_bags, n_genes)`` and of its pooled cells ``(n_pooled, n_genes)``.

        Both on the z-scored target scale; a cell's value must not depend on how many cells share its bag.
        """
        raise NotImplementedError

    def prepare(self, target: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Called once by :func:`bitro.tl.fit` before training, with the z-scored targets of the training bags.

        For what a network derives from the training expression itself (e.g. a retrieval bank, a gene basis); saved
        with the weights when kept as buffers. ``reference``: z-scored expression of other sections on the same genes
        (``gene_reference`` of :func:`bitro.tl.fit`), or ``None``. Default: nothing.
        """

    def loss(self, batch: Batch, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of a batch against the bags' z-scored targets, and its named parts (for the history).

        Default: the mean squared error of the bags' predictions.
        """
        y, _ = self(batch)
        mse = F.mse_loss(y, target)
        return mse, {"mse": mse}

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
        """The bags' predictions ``(n_bags, n_genes)`` (z-scores), in evaluation mode and without gradients.

        With ``cell_scale``, each pooled cell's value on the target scale is added to ``cell_out[cell_rows[cell]]``.
        Default: whole bags, batched up to ``tokens_per_batch`` cells (a bag larger than that is a batch of its
        own); ``progress`` (a tqdm bar) is advanced once per batch.
        """
        device = next(self.parameters()).device
        y = np.zeros((len(bags), self.arch.n_genes))
        for group in token_groups([(b, list(bag)) for b, bag in enumerate(bags)], tokens_per_batch):
            index = [b for b, _ in group]
            batch = collate([bag for _, bag in group], cells).to(device)
            with torch.no_grad():
                yb, cell_values = self(batch)
            y[index] = yb.cpu().numpy()
            if cell_scale is not None:
                rows = cell_rows[batch.cell[batch.pool].cpu().numpy()]
                np.add.at(cell_out, rows, cell_scale(cell_values.cpu().numpy()).astype(np.float32))
            if progress is not None:
                progress.update()
        return y

    def n_batches(self, bags: Sequence[Sequence[Seq]], tokens_per_batch: int) -> int:
        """How many batches :meth:`predict_bags` runs (for a progress bar)."""
        return len(token_groups([(b, list(bag)) for b, bag in enumerate(bags)], tokens_per_batch))


def fit_bank(net: nn.Module, state_dict: dict, prefix: str) -> None:
    """Give ``net.bank`` (a retrieval bank: training profiles x genes) the saved bank's rows before loading.

    A bank has as many rows as the network had training bags, so a freshly built network cannot know its size;
    a bank for other genes is refused in one sentence.
    """
    key = prefix + "bank"
    if key not in state_dict:
        return
    bank, n_genes = state_dict[key], net.arch.n_genes
    if bank.ndim != 2 or bank.shape[1] != n_genes:
        genes = bank.shape[1] if bank.ndim == 2 else f"a {tuple(bank.shape)}-shaped array of"
        msg = (
            f"The retrieval bank holds {genes} genes but the model predicts {n_genes}; these weights belong to "
            f"another {type(net).__name__} (load them into one made with the same genes)."
        )
        raise ValueError(msg)
    net.bank = torch.zeros(tuple(bank.shape), dtype=net.bank.dtype, device=net.bank.device)


def token_groups(parts: list[tuple[int, Any]], tokens_per_batch: int) -> list[list[tuple[int, Any]]]:
    """Consecutive ``(bag, part)`` items grouped into batches of at most ``tokens_per_batch`` cells.

    A part is a :class:`~bitro.tl._bags.Seq` or a list of them; one larger than the limit is a batch of its own.
    """

    def size(part: Any) -> int:
        return sum(len(s.cells) for s in part) if isinstance(part, list) else len(part.cells)

    groups, cur, n = [], [], 0
    for p in parts:
        if cur and n + size(p[1]) > tokens_per_batch:
            groups.append(cur)
            cur, n = [], 0
        cur.append(p)
        n += size(p[1])
    if cur:
        groups.append(cur)
    return groups


def predict_ensemble(
    nets: Sequence[CellBagNetwork],
    bags: Sequence[Sequence[Seq]],
    cells: CellData,
    *,
    tokens_per_batch: int = 8192,
    cell_scale: Callable[[np.ndarray], np.ndarray] | None = None,
    desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Predictions (z-scores, ensemble mean) of ``bags``, and optionally the cell values they imply.

    With ``cell_scale`` (a map from z-scores ``(n, n_genes)`` to the target scale) every pooled cell gets its
    networks' values on the target scale, averaged over the ensemble and over the bags that pool it.

    Returns
    -------
    ``y`` ``(n_bags, n_genes)``; with ``cell_scale`` also the cell values for the cells pooled by at least one bag
    only ``(n_covered, n_genes)`` (float32, in cell order) and how many bags pooled each cell ``(n_cells,)``; else
    ``None, None``.
    """
    from tqdm.auto import tqdm

    from bitro._settings import settings

    n_genes, n_cells = nets[0].arch.n_genes, len(cells.features)
    cell_out = cell_rows = n_bags = None
    if cell_scale is not None:  # rows only for the cells some bag pools: a slide's uncovered cells cost nothing
        n_bags = np.bincount(
            np.concatenate([np.zeros(0, np.int64), *(s.cells[: s.n_pool] for bag in bags for s in bag)]),
            minlength=n_cells,
        )
        cell_rows = np.cumsum(n_bags > 0) - 1
        cell_out = np.zeros((int((n_bags > 0).sum()), n_genes), dtype=np.float32)
    total = sum(net.n_batches(bags, tokens_per_batch) for net in nets)
    bar = tqdm(total=total, desc=desc or "predict", disable=not settings.progress or desc is None)
    y = np.zeros((len(bags), n_genes))
    for net in nets:
        net.eval()
        y += net.predict_bags(
            bags,
            cells,
            tokens_per_batch=tokens_per_batch,
            cell_scale=cell_scale,
            cell_rows=cell_rows,
            cell_out=cell_out,
            progress=bar,
        )
    bar.close()
    y /= len(nets)
    if cell_out is None:
        return y, None, None
    # the mean over the ensemble and over the bags pooling each cell, in place (the table's own memory)
    np.divide(cell_out, (len(nets) * n_bags[n_bags > 0])[:, None].astype(np.float32), out=cell_out)
    return y, cell_out, n_bags
