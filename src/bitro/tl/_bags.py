"""Bags of cells: which cells make each prediction, their tissue context, and batching.

A *bag* is what one prediction is pooled over: the cells inside one spot (``target="spot"``) or all cells
of a slide (``target="bulk"``). A bag is a list of *sequences*, the units the Transformer attends within:

- spot bag: one sequence, the spot's cells (pooled) followed by *context* cells, the cells within
  ``context_radius`` micrometres of the spot centre that are not in the spot. The Transformer attends to
  them, the pooling does not. At most ``max_context`` context cells, subsampled deterministically
  (evenly along their distance to the centre), so a spot's bag never depends on other spots.
- bulk bag: the slide's cells cut into spatially contiguous chunks of about ``chunk_size`` cells, one
  sequence each, all pooled. Training samples a few chunks per slide and step (memory stays bounded for
  any slide size); prediction uses every chunk (see :func:`bitro.tl.predict`).

Positions are micrometres relative to the sequence centre (spot centre, chunk centre).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from bitro._checks import check_finite_array, check_unique_index, duplicates
from bitro._constants import Key
from bitro._features import FEATURE_SETTINGS, FIX, PATCH_LAYOUT, differences, fingerprint, plain, record_of
from bitro._logging import logger
from bitro._utils import check_key

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

    from bitro.tl._config import BagSettings, ModelConfig


@dataclass
class Seq:
    """One sequence of a bag: cell rows (pooled cells first), how many are pooled, centre (um).

    ``patch``: the spot's patch embedding (``patch_key`` of :func:`bitro.tl.fit`), or ``None``.
    """

    cells: np.ndarray
    n_pool: int
    centre: np.ndarray
    patch: np.ndarray | None = None


@dataclass
class CellData:
    """What the model reads from the cell table, as arrays."""

    features: np.ndarray
    xy_um: np.ndarray
    sample: np.ndarray
    spot_id: np.ndarray
    phenotype: np.ndarray
    adjacency: sp.csr_matrix
    pixel_size: dict[str, float]

    @property
    def n_features(self) -> int:
        """Feature dimension."""
        return int(self.features.shape[1])


@dataclass
class Batch:
    """A batch of bags as flat tensors.

    Attributes
    ----------
    x
        ``(n_tokens, n_features)`` cell features; tokens are ordered by sequence, sequences by bag.
    pos
        ``(n_tokens, 2)`` cell position relative to its sequence's centre, in micrometres.
    edge_index
        ``(2, n_edges)`` kNN edges between tokens of the same sequence.
    seq
        ``(n_tokens,)`` sequence of each token (sorted).
    pool
        ``(n_tokens,)`` True for tokens pooled into the bag's prediction (False: context only).
    bag
        ``(n_sequences,)`` bag of each sequence (sorted).
    n_bags
        Number of bags.
    phenotype
        ``(n_tokens,)`` phenotype code of each token (-1: unknown).
    cell
        ``(n_tokens,)`` row of each token in the cell table.
    size
        ``(n_bags,)`` bag size: ``log1p`` of the number of pooled cells of the whole bag (before any
        sampling or cell dropout).
    patch
        ``(n_sequences, patch_dim)`` each sequence's patch embedding (``patch_key`` of :func:`bitro.tl.fit`), or
        ``None``.
    """

    x: torch.Tensor
    pos: torch.Tensor
    edge_index: torch.Tensor
    seq: torch.Tensor
    pool: torch.Tensor
    bag: torch.Tensor
    n_bags: int
    phenotype: torch.Tensor
    cell: torch.Tensor
    size: torch.Tensor
    patch: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device``."""
        import torch

        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**kw)

    @property
    def pooled_bag(self) -> torch.Tensor:
        """Bag of each pooled token."""
        return self.bag[self.seq][self.pool]


#: Feature dtypes kept as they are (a patch table's pixels and tokens); any other is read as float32.
COMPACT_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32))


def _missing(values: pd.Series) -> np.ndarray:
    return values.isna().to_numpy() | (values.astype(str).to_numpy() == "")


def cell_data(
    cells: AnnData,
    *,
    use_rep: str = Key.FEATURES,
    graph_key: str = Key.GRAPH,
    phenotype_key: str = Key.PHENOTYPE,
    need_phenotype: bool = False,
) -> CellData:
    """Check the cell table and read it into a :class:`CellData` (raises before any work on bad input).

    ``use_rep``, ``graph_key`` and ``phenotype_key`` name what ``bt.pp.extract_cells``, ``bt.pp.spatial_graph``
    (``.obsp[f"{graph_key}_connectivities"]``) and ``bt.pp.phenotypes`` wrote.
    """
    connectivities = f"{graph_key}_connectivities"
    if not isinstance(cells, AnnData):
        msg = f"The cell table must be an AnnData, got {type(cells).__name__}. Pass `cells=sdata['cells']`."
        raise TypeError(msg)
    check_key(cells.obsm, use_rep, "Cell features .obsm")
    check_key(cells.obsm, Key.SPATIAL, "Cell centroids .obsm")
    check_key(cells.obs.columns, Key.SAMPLE, "Cell table column .obs")
    check_key(cells.obsp, connectivities, "Cell kNN graph .obsp (run `bt.pp.spatial_graph`)")
    if need_phenotype:
        what = "Cell phenotypes .obs (run `bt.pp.phenotypes` or set cluster_weight=0)"
        check_key(cells.obs.columns, phenotype_key, what)
    check_unique_index(
        cells.obs_names,
        "The cell table (.obs_names)",
        "give every cell its own id, e.g. `cells.obs_names_make_unique()`",
    )
    features = np.asarray(cells.obsm[use_rep])
    if features.dtype not in COMPACT_DTYPES:  # pixel blocks (uint8) and encoder tokens (float16) stay compact
        features = features.astype(np.float32)
    if features.ndim != 2 or not np.isfinite(features).all():
        msg = (
            f"Cell features .obsm[{use_rep!r}] must be a finite 2-D array (cells x features); "
            "drop the cells with NaN or infinite features or extract them again with `bt.pp.extract_cells`."
        )
        raise ValueError(msg)
    centroids = np.asarray(cells.obsm[Key.SPATIAL])
    if centroids.ndim != 2 or centroids.shape[1] < 2:
        msg = f"Cell centroids .obsm[{Key.SPATIAL!r}] must be a (cells x 2) array of x, y pixels, got shape {centroids.shape}."
        raise ValueError(msg)
    check_finite_array(
        centroids[:, :2],
        f"Cell centroids .obsm[{Key.SPATIAL!r}] of the cell table",
        "drop those cells or segment again",
    )
    samples = cells.obs[Key.SAMPLE].astype(str).to_numpy()
    sizes = cells.uns.get(Key.UNS, {}).get(Key.PIXEL_SIZE, {})
    lacking = sorted(set(samples) - set(map(str, sizes)))
    if lacking:
        msg = (
            f"The cell table has no pixel size for samples {lacking}: expected "
            f"`cells.uns[{Key.UNS!r}]['pixel_size'] = {{sample: um_per_px}}` (written by `bt.pp.extract_cells`)."
        )
        raise KeyError(msg)
    pixel_size = {str(k): float(v) for k, v in sizes.items()}
    xy = np.asarray(cells.obsm[Key.SPATIAL], dtype=np.float64)[:, :2]
    xy_um = xy * np.array([pixel_size[s] for s in samples])[:, None]
    spot = cells.obs[Key.SPOT_ID] if Key.SPOT_ID in cells.obs else pd.Series([""] * cells.n_obs, index=cells.obs_names)
    spot_id = np.where(_missing(spot), "", spot.astype(str).to_numpy()).astype(object)
    if phenotype_key in cells.obs:
        ph = cells.obs[phenotype_key].astype("category").cat.codes.to_numpy().astype(np.int64)
    else:
        ph = np.full(cells.n_obs, -1, dtype=np.int64)
    adjacency = sp.csr_matrix(cells.obsp[connectivities])
    return CellData(features, xy_um, samples, spot_id, ph, adjacency, pixel_size)


def _spot_seq(pooled: np.ndarray, near: np.ndarray, centre: np.ndarray, cells: CellData, max_context: int) -> Seq:
    """A spot's sequence: its pooled cells, then at most ``max_context`` of the ``near`` cells that are not pooled.

    Context cells are subsampled evenly along their distance to the centre, so the bag never depends on other spots.
    """
    near = near[~np.isin(near, pooled)]
    if len(near) > max_context:
        order = np.argsort(np.linalg.norm(cells.xy_um[near] - centre, axis=1), kind="stable")
        near = near[order[np.linspace(0, len(near) - 1, max_context).round().astype(int)]] if max_context else near[:0]
    return Seq(np.concatenate([pooled, np.sort(near)]), len(pooled), centre)


def _spot_rows(spots: AnnData, cells: CellData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample, spot id and centre (section pixels) of each row of a spot table, checked against the cells."""
    check_key(spots.obs.columns, Key.SAMPLE, "Spot table column .obs")
    check_key(spots.obsm, Key.SPATIAL, "Spot centres .obsm")
    s_sample = spots.obs[Key.SAMPLE].astype(str).to_numpy()
    lacking = sorted(set(s_sample) - set(cells.pixel_size))
    if lacking:
        msg = f"Spot samples {lacking} have no cells in the cell table (samples there: {sorted(set(cells.sample))})."
        raise KeyError(msg)
    s_id = (spots.obs[Key.SPOT_ID] if Key.SPOT_ID in spots.obs else spots.obs_names.to_series()).astype(str).to_numpy()
    dup = duplicates(pd.Series(s_sample) + " / " + pd.Series(s_id))
    if dup:
        column = f".obs[{Key.SPOT_ID!r}]" if Key.SPOT_ID in spots.obs else ".obs_names"
        msg = (
            f"The spot table names spots {dup[:3]} (sample / spot id) more than once in {column}, so their cells "
            "would be pooled into several rows; give every spot of a section its own id (drop or rename duplicated rows)."
        )
        raise ValueError(msg)
    centres = np.asarray(spots.obsm[Key.SPATIAL], dtype=np.float64)
    if centres.ndim != 2 or centres.shape[1] < 2 or len(centres) != spots.n_obs:
        msg = f"Spot centres .obsm[{Key.SPATIAL!r}] must be a (spots x 2) array of x, y pixels, got shape {centres.shape}."
        raise ValueError(msg)
    check_finite_array(centres[:, :2], f"Spot centres .obsm[{Key.SPATIAL!r}] of the spot table", "drop those spots")
    return s_sample, s_id, centres[:, :2]


#: Most of the spot ids a section's cells name may be missing from the spot table before it is refused.
MAX_MISSING_SPOTS = 0.5
#: Most of a section's cells that may lie nearer another spot's centre than their own spot's.
MAX_MISPLACED_CELLS = 0.05


def check_cells_match_spots(spots: AnnData, cells: CellData) -> None:
    """Raise when the cell table does not belong to the spot table, beyond sharing section names.

    Per section: the spot ids its cells name must mostly be rows of the spot table (at most
    :data:`MAX_MISSING_SPOTS` missing, e.g. spots dropped by quality control), and the cells must lie nearest
    to the centre of the spot they name (at most :data:`MAX_MISPLACED_CELLS` do not), which holds for cells
    assigned to non-overlapping spot circles of the same section.
    """
    from scipy.spatial import cKDTree

    s_sample, s_id, centres = _spot_rows(spots, cells)
    fix = (
        "pass the cell table made from the same SpatialData as the spot table "
        "(`bt.pp.extract_cells(sdata)` assigns the cells to that SpatialData's spots)"
    )
    for sample in pd.unique(s_sample):
        rows = np.flatnonzero(s_sample == sample)
        crow = np.flatnonzero((cells.sample == sample) & (cells.spot_id != ""))
        if not len(crow):
            continue
        named = cells.spot_id[crow].astype(str)
        pos = pd.Index(s_id[rows]).get_indexer(named)
        uniq = pd.unique(named)
        missing = np.setdiff1d(uniq, s_id[rows])
        if len(missing) > MAX_MISSING_SPOTS * len(uniq):
            msg = (
                f"The cells of section {sample!r} name {len(uniq)} spots, of which {len(missing)} (e.g. "
                f"{list(missing[:3])}) are not in the spot table: the tables do not belong together; {fix}."
            )
            raise ValueError(msg)
        known = pos >= 0
        if known.sum() < 2 or len(rows) < 2:
            continue
        centre_um = centres[rows] * cells.pixel_size[str(sample)]
        _, nearest = cKDTree(centre_um).query(cells.xy_um[crow[known]])
        misplaced = float(np.mean(nearest != pos[known]))
        if misplaced > MAX_MISPLACED_CELLS:
            msg = (
                f"{misplaced:.0%} of the cells of section {sample!r} lie nearer another spot's centre than the centre "
                f"of the spot they name (.obs[{Key.SPOT_ID!r}]): the cell and spot tables do not share coordinates; {fix}."
            )
            raise ValueError(msg)


def spot_bags(
    spots: AnnData,
    cells: CellData,
    *,
    context_radius: float,
    max_context: int,
    radius: float | None = None,
    empty: Literal["skip", "context"] = "skip",
    patches: np.ndarray | None = None,
) -> list[list[Seq] | None]:
    """One bag per row of the spot table.

    The pooled cells of a spot are the cells whose ``.obs["spot_id"]`` names it, matched by
    ``(.obs["sample"], .obs["spot_id"])`` (the spot table's ``obs_names`` when it has no ``"spot_id"`` column);
    with ``radius`` (um), the cells within that distance of its centre instead (virtual spots). Spot centres
    are ``.obsm["spatial"]`` in the section's pixels. A spot without a pooled cell is ``None`` (``empty="skip"``)
    or pools its context cells instead (``empty="context"``; ``None`` when there are none either). ``patches``:
    one patch embedding per row (:func:`patch_embeddings`), carried by the row's sequence.
    """
    from scipy.spatial import cKDTree

    s_sample, s_id, centres = _spot_rows(spots, cells)
    bags: list[list[Seq] | None] = [None] * spots.n_obs
    for sample in pd.unique(s_sample):
        rows = np.flatnonzero(s_sample == sample)
        cell_rows = np.flatnonzero(cells.sample == sample)
        members = pd.Series(cell_rows).groupby(cells.spot_id[cell_rows]).agg(list).to_dict()
        tree = cKDTree(cells.xy_um[cell_rows]) if len(cell_rows) else None
        for r in rows:
            centre = centres[r] * cells.pixel_size[sample]
            if radius is None:
                pooled = np.asarray(members.get(s_id[r], []), dtype=np.int64)
            else:
                pooled = np.sort(cell_rows[tree.query_ball_point(centre, radius)]) if tree else np.zeros(0, np.int64)
            near = np.zeros(0, dtype=np.int64)
            if (
                tree is not None
                and context_radius > 0
                and (max_context > 0 or (empty == "context" and not len(pooled)))
            ):
                near = cell_rows[tree.query_ball_point(centre, context_radius)]
            if not len(pooled):
                if empty == "skip" or not len(near):
                    continue
                pooled, near = np.sort(near), near[:0]
            bags[r] = [_spot_seq(pooled, near, centre, cells, max_context)]
            if patches is not None:
                bags[r][0].patch = patches[r]
    n_empty = sum(b is None for b in bags)
    if n_empty:
        logger.info(f"{n_empty} of {spots.n_obs} spots have no cell to pool and are skipped.")
    return bags


def chunk_cells(xy_um: np.ndarray, chunk_size: int) -> list[np.ndarray]:
    """Split cells into spatially contiguous chunks of at most ``chunk_size`` (recursive median splits)."""
    out: list[np.ndarray] = []
    stack = [np.arange(len(xy_um))]
    while stack:
        idx = stack.pop()
        if len(idx) <= chunk_size:
            out.append(idx)
            continue
        pts = xy_um[idx]
        axis = int(np.argmax(pts.max(0) - pts.min(0)))
        order = idx[np.argsort(pts[:, axis], kind="stable")]
        half = len(order) // 2
        stack.extend([order[half:], order[:half]])
    return out


def bulk_bags(bulk: AnnData, cells: CellData, *, chunk_size: int) -> list[list[Seq] | None]:
    """One bag per row of the bulk table: all cells of its ``.obs["sample"]``, in chunks.

    A row with spot ids in ``.obs["spot_ids"]`` (a region, see :func:`bitro.tl.pseudobulk`) keeps only the cells
    of those spots (``None`` when none of them has a cell).
    """
    check_key(bulk.obs.columns, Key.SAMPLE, "Bulk table column .obs")
    b_sample = bulk.obs[Key.SAMPLE].astype(str).to_numpy()
    lacking = sorted(set(b_sample) - set(cells.sample))
    if lacking:
        msg = f"Bulk samples {lacking} have no cells in the cell table (samples there: {sorted(set(cells.sample))})."
        raise KeyError(msg)
    regions = [""] * bulk.n_obs
    if Key.SPOT_IDS in bulk.obs:
        ids = bulk.obs[Key.SPOT_IDS]
        regions = np.where(_missing(ids), "", ids.astype(str).to_numpy())
    bags: list[list[Seq] | None] = []
    for sample, region in zip(b_sample, regions, strict=True):
        rows = np.flatnonzero(cells.sample == sample)
        if region:
            rows = rows[np.isin(cells.spot_id[rows], region.split(Key.SPOT_IDS_SEP))]
            if not len(rows):
                bags.append(None)
                continue
        seqs = []
        for part in chunk_cells(cells.xy_um[rows], chunk_size):
            c = rows[np.sort(part)]
            seqs.append(Seq(c, len(c), cells.xy_um[c].mean(0)))
        bags.append(seqs)
    return bags


def pooled_radius(bags: Sequence[Sequence[Seq]], cells: CellData) -> float:
    """The radius (um) of the training spots, seen from their cells: the farthest pooled cell from a spot centre.

    Virtual spots (:func:`bitro.pp.virtual_spots`) of this radius make bags of the size the model was trained on.
    """
    far = [float(np.linalg.norm(cells.xy_um[s.cells[: s.n_pool]] - s.centre, axis=1).max()) for b in bags for s in b]
    return float(np.quantile(far, 0.99)) if far else 0.0


def log_cell_count(bag: Sequence[Seq]) -> float:
    """``log1p`` of the number of pooled cells of a bag (the model's bag-size input)."""
    return float(np.log1p(sum(s.n_pool for s in bag)))


def _drop(seq: Seq, rate: float, rng: np.random.Generator) -> Seq:
    keep = rng.random(len(seq.cells)) >= rate
    keep[: seq.n_pool] |= ~keep[: seq.n_pool].any() & (np.arange(seq.n_pool) == 0)  # keep one pooled cell
    return Seq(seq.cells[keep], int(keep[: seq.n_pool].sum()), seq.centre, seq.patch)  # the patch is never dropped


def collate(
    bags: Sequence[Sequence[Seq]],
    cells: CellData,
    *,
    rng: np.random.Generator | None = None,
    cell_dropout: float = 0.0,
    max_cells: int | None = None,
):
    """Flat :class:`Batch` of ``bags``.

    With ``rng`` (training): each bag keeps a random subset of its sequences of at most ``max_cells``
    cells (bulk), and each cell is dropped with probability ``cell_dropout`` (one pooled cell always stays).
    """
    import torch

    seqs, seq_bag = [], []
    size = np.array([log_cell_count(bag) for bag in bags])
    for b, bag in enumerate(bags):
        chosen = list(bag)
        if rng is not None and max_cells is not None and len(chosen) > 1:
            order = rng.permutation(len(chosen))
            sizes = np.cumsum([len(chosen[i].cells) for i in order])
            chosen = [chosen[i] for i in np.sort(order[: max(1, int((sizes <= max_cells).sum()))])]
        if rng is not None and cell_dropout > 0:
            chosen = [_drop(s, cell_dropout, rng) for s in chosen]
        seqs.extend(chosen)
        seq_bag.extend([b] * len(chosen))
    idx = np.concatenate([s.cells for s in seqs])
    lengths = np.array([len(s.cells) for s in seqs])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pool = np.concatenate([np.arange(len(s.cells)) < s.n_pool for s in seqs])
    pos = cells.xy_um[idx] - np.repeat(np.stack([s.centre for s in seqs]), lengths, axis=0)
    edges = []
    for s, start in zip(seqs, starts, strict=True):
        sub = cells.adjacency[s.cells][:, s.cells].tocoo()
        edges.append(np.stack([sub.col, sub.row]) + start)  # messages flow from neighbour (col) to cell (row)
    with_patch = [s.patch is not None for s in seqs]
    if any(with_patch) and not all(with_patch):
        msg = "Some sequences of the batch carry a patch embedding and others do not; give every spot one."
        raise ValueError(msg)
    patch = torch.from_numpy(np.stack([s.patch for s in seqs]).astype(np.float32)) if all(with_patch) else None
    return Batch(
        x=torch.from_numpy(cells.features[idx]),
        pos=torch.from_numpy(pos.astype(np.float32)),
        edge_index=torch.from_numpy(np.concatenate(edges, axis=1).astype(np.int64)),
        seq=torch.from_numpy(np.repeat(np.arange(len(seqs)), lengths)),
        pool=torch.from_numpy(pool),
        bag=torch.from_numpy(np.asarray(seq_bag, dtype=np.int64)),
        n_bags=len(bags),
        phenotype=torch.from_numpy(cells.phenotype[idx]),
        cell=torch.from_numpy(idx),
        size=torch.from_numpy(size.astype(np.float32)),
        patch=patch,
    )


def resolve_tables(
    data: AnnData | SpatialData,
    target: str,
    *,
    cells: AnnData | None,
    table_key: str | None,
    cells_key: str = Key.CELLS_TABLE,
) -> tuple[AnnData, AnnData]:
    """The expression table and the cell table, from an AnnData + ``cells`` or from a SpatialData.

    ``table_key`` defaults to ``"spots"`` for ``target="spot"`` and ``"bulk"`` otherwise.
    """
    from bitro._utils import get_table

    if not isinstance(data, AnnData):
        from spatialdata import SpatialData

        if not isinstance(data, SpatialData):
            msg = f"`data` must be an AnnData or a SpatialData, got {type(data).__name__}."
            raise TypeError(msg)
        if cells is None:
            cells = get_table(data, cells_key, "Cell table")
        data = get_table(data, table_key or (Key.SPOTS_TABLE if target == "spot" else Key.BULK_TABLE))
    if cells is None:
        msg = f"Give the cell table: `cells=` (an AnnData), or pass a SpatialData holding a {cells_key!r} table."
        raise ValueError(msg)
    return data, cells


def make_bags(
    table: AnnData,
    cells: CellData,
    target: str,
    settings: BagSettings,
    *,
    for_what: str,
    patches: bool = False,
    embeddings: np.ndarray | None = None,
) -> tuple[list[list[Seq]], np.ndarray]:
    """The training bags of the rows of ``table`` that have cells, and which rows those are (``keep``).

    Raises when fewer than 2 rows have cells (``for_what``: ``"train"`` or ``"fine-tune"``, for the message).
    ``patches``: ``cells`` is a patch table, whose tokens may reach beyond their spot (not checked against it).
    ``embeddings``: each spot row's patch embedding (:func:`patch_embeddings`), carried by its bag.
    """
    if target == "spot":
        if not patches:
            check_cells_match_spots(table, cells)
        all_bags = spot_bags(
            table,
            cells,
            context_radius=settings.context_radius,
            max_context=settings.max_context,
            patches=embeddings,
        )
    else:
        all_bags = bulk_bags(table, cells, chunk_size=settings.chunk_size)
    keep = np.array([b is not None for b in all_bags])
    if keep.sum() < 2:
        msg = f"Only {int(keep.sum())} {target} rows have cells; at least 2 are needed to {for_what}."
        raise ValueError(msg)
    return [b for b in all_bags if b is not None], keep


def feature_config(cells: AnnData, use_rep: str) -> dict[str, Any]:
    """What a model records of its training cells' features: the settings that define them and the fingerprint."""
    record = record_of(cells)
    if record is None:
        msg = (
            f"The cell table has no extraction record `.uns[{Key.UNS!r}][{Key.EXTRACT_CELLS!r}]`, so nothing says what "
            "its features mean and new slides could not be matched to them. Build the cell table with "
            "`bt.pp.extract_cells` (any encoder, including your own callable)."
        )
        raise ValueError(msg)
    check_key(cells.obsm, use_rep, "Cell features .obsm")
    return {
        **{k: plain(record.get(k)) for k in FEATURE_SETTINGS},
        "feature_key": use_rep,
        "n_features": int(np.shape(cells.obsm[use_rep])[1]),
        "feature_names": plain(record.get("feature_names", [])),
        "fingerprint": fingerprint(record),
        **({PATCH_LAYOUT: plain(record[PATCH_LAYOUT])} if record.get(PATCH_LAYOUT) is not None else {}),
    }


#: How to make the per-spot patch embedding a BiTro model with patch tokens reads (``patch_key`` of :func:`bitro.tl.fit`).
PATCH_EMBEDDING_HOW = (
    "cut each spot's patches with `bt.pp.spot_patches(sdata, encoder='efficientnet', scales=3, fov='growing')` and "
    "write the mean of each spot's tokens per scale into the spot table with `bt.tl.spot_image_features(sdata)` "
    "(.obsm['X_bitro_image'], spots x scales * 1280)"
)


def patch_embeddings(table: AnnData, key: str, *, width: int | None = None) -> np.ndarray:
    """Each row's patch embedding ``table.obsm[key]`` (rows x width, float32), checked before any work.

    ``width``: the width a trained model reads. Raises a :class:`ValueError` saying what is missing and how to make it.
    """
    if key not in table.obsm:
        msg = (
            f"The model reads each spot's patch embedding .obsm[{key!r}], which the spot table lacks (obsm: "
            f"{sorted(table.obsm) or 'none'}); {PATCH_EMBEDDING_HOW}."
        )
        raise ValueError(msg)
    x = np.asarray(table.obsm[key])
    if x.ndim != 2 or x.shape[0] != table.n_obs or not np.issubdtype(x.dtype, np.number):
        msg = f"The patch embedding .obsm[{key!r}] must be a numeric (spots x features) array, got shape {x.shape}."
        raise ValueError(msg)
    if width is not None and x.shape[1] != width:
        msg = (
            f"The model was trained on {width}-wide patch embeddings .obsm[{key!r}], the spot table's are "
            f"{x.shape[1]} wide; make them as the training spots' were: {PATCH_EMBEDDING_HOW}."
        )
        raise ValueError(msg)
    x = x.astype(np.float32)
    check_finite_array(x, f"The patch embedding .obsm[{key!r}]", "drop those spots or embed them again")
    return x


def field_embeddings(spots: AnnData, cells: CellData, radii: Sequence[float]) -> np.ndarray:
    """Each spot row's fields of cells: the mean features of the cells within each radius (um) of its centre.

    Returns rows x ``len(radii) * n_features`` (float32), one block per radius in the order given; a field without a
    cell holds zeros (the features' centre, as the scaler + PCA leaves them). Spot centres are ``.obsm["spatial"]`` in
    the section's pixels, as for :func:`spot_bags`.
    """
    from scipy.spatial import cKDTree

    s_sample, _, centres = _spot_rows(spots, cells)
    n_feat = cells.n_features
    out = np.zeros((spots.n_obs, len(radii) * n_feat), dtype=np.float32)
    for sample in pd.unique(s_sample):
        rows = np.flatnonzero(s_sample == sample)
        cell_rows = np.flatnonzero(cells.sample == sample)
        if not len(cell_rows):
            continue
        tree = cKDTree(cells.xy_um[cell_rows])
        feats = np.asarray(cells.features[cell_rows], dtype=np.float32)
        centre_um = centres[rows] * cells.pixel_size[sample]
        for j, r in enumerate(radii):
            found = tree.query_ball_point(centre_um, r)  # each spot's cells within r
            counts = np.array([len(f) for f in found])
            spot_of = np.repeat(np.arange(len(rows)), counts)
            cell_of = np.concatenate(found).astype(np.int64)
            members = sp.csr_matrix((np.ones(len(cell_of), np.float32), (spot_of, cell_of)), shape=(len(rows), len(cell_rows)))
            out[rows, j * n_feat : (j + 1) * n_feat] = (members @ feats) / np.maximum(counts, 1)[:, None]
    return out


def bag_embeddings(config: ModelConfig, table: AnnData, cells: CellData, *, target: str) -> np.ndarray | None:
    """What the bags of ``table`` (rows of level ``target``) carry beside their cells for a model of ``config``.

    The patch embedding (``patch_key``), the fields of cells (``field_radii``, :func:`field_embeddings`) or nothing;
    bulk rows, which have no centre, carry nothing.
    """
    if target != "spot":
        return None
    if config.patch_key is not None:
        return patch_embeddings(table, config.patch_key, width=config.architecture.patch_dim)
    radii = getattr(config.architecture, "field_radii", ())
    return field_embeddings(table, cells, radii) if radii else None


def check_features(
    config: ModelConfig, reference: dict[str, Any], cells: AnnData, *, spots: AnnData | None = None
) -> None:
    """Raise, in one line, when the cell table's features do not mean what a model was trained on.

    ``config`` and ``reference``: the model's :class:`~bitro.tl._config.ModelConfig` and cell reference. A model
    with patch tokens (``config.patch_key``) also needs ``spots``, a spot table holding the patch embedding it was
    trained on (:func:`patch_embeddings`); without one (fine-tuning, slides without spots) it is refused.
    """
    if config.patch_key is not None:
        if spots is None or config.target != "spot":
            msg = (
                f"This model reads each spot's patch embedding .obsm[{config.patch_key!r}] beside its cells "
                "(`patch_key` of bt.tl.fit), which only a spot table holding it gives: it predicts measured spots "
                "(`bt.tl.predict(model, spots, cells=cells)`), not slides without spots, and cannot be fine-tuned "
                "with bt.tl.transfer; train a model without patch_key for those."
            )
            raise ValueError(msg)
        patch_embeddings(spots, config.patch_key, width=config.architecture.patch_dim)
    key, dim = config.feature_key, config.architecture.n_features
    check_key(cells.obsm, key, "Cell features .obsm")
    record = record_of(cells)
    if record is None:
        msg = (
            f"The cell table has no extraction record `.uns[{Key.UNS!r}][{Key.EXTRACT_CELLS!r}]`, so its features "
            f"cannot be checked against the model's. {FIX}."
        )
        raise ValueError(msg)
    trained = config.features
    if fingerprint(record) != trained["fingerprint"]:
        why = differences(reference.get(Key.EXTRACT_CELLS, trained), record)
        why = why or "the scaler + PCA differs from the model's"
        msg = f"The cell features do not match the model's: {why}. {FIX}."
        raise ValueError(msg)
    got = np.shape(cells.obsm[key])[1]
    if got != dim:
        msg = (
            f"The model was trained on {dim}-dimensional cell features .obsm[{key!r}], the cell table has {got}. {FIX}."
        )
        raise ValueError(msg)
