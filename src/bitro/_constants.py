"""Every default key name bitro reads or writes, in one place.

Functions take these as defaults for their ``*_key`` / ``key_added`` arguments, so that
``bt.tl.fit`` and ``bt.pl.*`` find what ``bt.pp.*`` wrote without being told.

Layout of a bitro SpatialData (one object may hold many sections; ``{s}`` is the section id):

- images ``"{s}_image"``: H&E, ``(c, y, x)`` uint8 RGB, multiscale, chunked, read lazily.
- coordinate systems: ``"{s}"`` is the full-resolution pixel grid of the section's image
  (Identity from the image's scale0); ``"{s}_um"`` is the same section in micrometres
  (a ``Scale`` by the pixel size). The pixel size (um/px) is read back from that transformation.
- shapes ``"{s}_spots"``: spot circles (radius in pixels), index = spot id.
- shapes ``"{s}_cells"``: cell (nucleus) polygons, index = cell id.
- table ``"spots"``: spots x genes raw counts, annotating every ``"{s}_spots"`` element.
- table ``"cells"``: the cell table, annotating every ``"{s}_cells"`` element.
- table ``"bulk"``: one row per slide (bulk profile), ``.obs["sample"]`` names the section.
- synthetic data only (:func:`bitro.datasets.synthetic`): shapes ``"{s}_true_nuclei"`` (ground-truth
  nucleus polygons) and table ``"truth"`` (one row per true cell, ``.obs["cell_type"]``, true expression).

All distances inside a section are in that section's pixels; micrometres are only used at the
API boundary (parameters given in um are converted with the section's pixel size).
"""

from __future__ import annotations

from typing import Final


class Key:
    """Default key names (see the module docstring for the layout)."""

    # --- SpatialData element naming -----------------------------------------------------
    IMAGE_SUFFIX: Final = "_image"
    SPOTS_SUFFIX: Final = "_spots"
    VIRTUAL_SPOTS_SUFFIX: Final = "_virtual_spots"
    CELLS_SUFFIX: Final = "_cells"
    TRUE_NUCLEI_SUFFIX: Final = "_true_nuclei"
    MICRONS_SUFFIX: Final = "_um"
    NORMALIZED_SUFFIX: Final = "_normalized"
    TISSUE_SUFFIX: Final = "_tissue"

    SPOTS_TABLE: Final = "spots"
    CELLS_TABLE: Final = "cells"
    BULK_TABLE: Final = "bulk"
    TRUTH_TABLE: Final = "truth"
    #: ``bt.pp.spot_patches``: one row per image token of each spot's patch (the input of the patch models).
    PATCHES_TABLE: Final = "patches"
    #: Tables :func:`bitro.tl.predict` writes: spots (measured or virtual) x genes and cells x genes.
    PREDICTED_SPOTS_TABLE: Final = "bitro_spots"
    PREDICTED_CELLS_TABLE: Final = "bitro_cells"

    # --- .obs ----------------------------------------------------------------------------
    SAMPLE: Final = "sample"
    REGION: Final = "region"
    SPOT_ID: Final = "spot_id"
    #: Patch table: each token's index in its spot's grid (row-major); spot table: the share of a spot's patch
    #: pixels that lay outside the image and were padded (``bt.pp.spot_patches``).
    TOKEN: Final = "token"
    PATCH_PADDING: Final = "bitro_patch_padding"
    CELL_ID: Final = "cell_id"
    PHENOTYPE: Final = "phenotype"
    CELL_TYPE: Final = "cell_type"
    #: TPIR (issue #16): labels transferred by scANVI (``ExpressionEncoder.transfer_labels``) and regions predicted
    #: from the image (``RegionClassifier.predict``); each with a ``"{key}_confidence"`` / ``"{key}_probability"``.
    TRANSFERRED: Final = "region_transferred"
    REGION_PREDICTED: Final = "region_predicted"
    #: A pathologist's region of each spot of an imaged HER2ST section (``bt.datasets.her2st(regions=True)``).
    REGION_PATHOLOGIST: Final = "region_pathologist"
    ARRAY_ROW: Final = "array_row"
    ARRAY_COL: Final = "array_col"
    #: Predicted tables: the cells pooled by a spot's bag, and where its prediction came from
    #: (``"spot"``: its own cells; ``"context"``: no cell inside, pooled from the cells around it).
    N_CELLS: Final = "n_cells"
    PREDICTED_FROM: Final = "predicted_from"
    #: Predicted cell table: in how many (virtual) spots' bags a cell was pooled.
    N_BAGS: Final = "n_bags"
    #: Pseudo-bulk tables (``bt.tl.pseudobulk``): the block of each row, its number of spots, and the ids of its
    #: spots joined by ``SPOT_IDS_SEP`` (empty for a whole-section row). A bulk row with spot ids is a region:
    #: its bag is the cells of those spots.
    BLOCK: Final = "block"
    N_SPOTS: Final = "n_spots"
    SPOT_IDS: Final = "spot_ids"
    SPOT_IDS_SEP: Final = ";"

    # --- .obsm ---------------------------------------------------------------------------
    SPATIAL: Final = "spatial"
    FEATURES_RAW: Final = "X_bitro_raw"
    FEATURES: Final = "X_bitro"
    #: The patch table's token features: uint8 pixel blocks or float16 encoder tokens (``bt.pp.spot_patches``).
    PATCHES: Final = "bitro_patches"
    #: Predictions on a spot / bulk table (``bt.tl.predict``'s ``key_added``; a DataFrame, rows x the model's genes),
    #: and the baselines of ``bt.tl.add_baselines`` beside them. ``.layers`` of these names are read too.
    PREDICTED: Final = "bitro_predicted"
    COLOR_STATS: Final = "bitro_color"
    BASELINE_MEAN: Final = "bitro_baseline_mean"
    BASELINE_RIDGE: Final = "bitro_baseline_ridge"
    BASELINE_RRR: Final = "bitro_baseline_rrr"
    #: TPIR (issue #16): the expression encoder's latent (``bt.tl.expression_encoder``), each spot's pooled image
    #: features (``bt.tl.spot_image_features``) and their projection aligned to the latent (``bt.tl.align_images``).
    EXPRESSION_LATENT: Final = "X_bitro_latent"
    IMAGE_FEATURES: Final = "X_bitro_image"
    IMAGE_EMBEDDING: Final = "X_bitro_aligned"

    # --- .obsp (as squidpy writes them with key_added="spatial") ---------------------------
    GRAPH: Final = "spatial"
    CONNECTIVITIES: Final = "spatial_connectivities"
    DISTANCES: Final = "spatial_distances"

    # --- .uns ----------------------------------------------------------------------------
    UNS: Final = "bitro"
    EXTRACT_CELLS: Final = "extract_cells"
    PHENOTYPES: Final = "phenotypes"
    #: ``.uns["bitro"]["spot_patches"]`` of a patch table: its settings and token layout.
    SPOT_PATCHES: Final = "spot_patches"
    #: ``.uns["bitro"]["predict"]``: one record per place predictions were written (``key_added``, or
    #: ``PREDICTIONS_IN_X`` for the tables whose ``.X`` holds them), so scores and plots find the scale of each.
    PREDICT: Final = "predict"
    PREDICTIONS_IN_X: Final = "X"
    #: ``.uns["bitro"]["evaluate"]``: the parameters of each ``bt.tl.evaluate`` run, keyed by its ``key_added``.
    EVALUATE: Final = "evaluate"
    #: ``.uns["bitro"]["pseudobulk"]`` of a ``bt.tl.pseudobulk`` table: its parameters.
    PSEUDOBULK: Final = "pseudobulk"
    EVALUATION: Final = "bitro_eval"
    # --- shapes columns and SpatialData.attrs[UNS] ----------------------------------------
    AREA_UM2: Final = "area_um2"
    SEGMENTATION: Final = "segmentation"
    NORMALIZE_STAIN: Final = "normalize_stain"
    #: Morphology columns of the cell table (``bt.pp.extract_cells``): the nucleus shape (lengths in um) ...
    MORPHOLOGY_SHAPE: Final = (
        "area_um2",
        "perimeter_um",
        "major_axis_um",
        "minor_axis_um",
        "eccentricity",
        "solidity",
        "circularity",
    )
    #: ... and the haematoxylin / eosin intensities in and around it.
    MORPHOLOGY_STAIN: Final = (
        "haematoxylin_nucleus",
        "eosin_nucleus",
        "haematoxylin_surround",
        "eosin_surround",
        "haematoxylin_nucleus_std",
    )
    MORPHOLOGY: Final = MORPHOLOGY_SHAPE + MORPHOLOGY_STAIN
    PIXEL_SIZE: Final = "pixel_size"

    # --- .uns / attrs records of bt.pp, bt.io, datasets
    #: ``.uns["bitro"]`` of the cell table: the parameters of :func:`bitro.pp.spatial_graph` (see :meth:`keyed`).
    SPATIAL_GRAPH: Final = "spatial_graph"
    #: ``.uns["bitro"]`` of the spot tables: :func:`bitro.io.read_st` parameters per section, the dataset
    #: (:func:`bitro.datasets.her2st`), :func:`bitro.pp.pseudo_spots` and :func:`bitro.pp.virtual_spots` parameters.
    READ_ST: Final = "read_st"
    DATASET: Final = "dataset"
    PSEUDO_SPOTS: Final = "pseudo_spots"
    VIRTUAL_SPOTS: Final = "virtual_spots"
    #: ``.uns["bitro"]`` of the synthetic ``"truth"`` table: the generator's parameters.
    SYNTHETIC: Final = "synthetic"

    @staticmethod
    def image(sample: str) -> str:
        """Image element name of a section."""
        return f"{sample}{Key.IMAGE_SUFFIX}"

    @staticmethod
    def spots(sample: str) -> str:
        """Spot shapes element name of a section."""
        return f"{sample}{Key.SPOTS_SUFFIX}"

    @staticmethod
    def virtual_spots(sample: str) -> str:
        """Virtual spot shapes element name of a section (:func:`bitro.pp.virtual_spots`)."""
        return f"{sample}{Key.VIRTUAL_SPOTS_SUFFIX}"

    @staticmethod
    def cells(sample: str) -> str:
        """Cell shapes element name of a section."""
        return f"{sample}{Key.CELLS_SUFFIX}"

    @staticmethod
    def true_nuclei(sample: str) -> str:
        """Ground-truth nucleus shapes element name of a synthetic section."""
        return f"{sample}{Key.TRUE_NUCLEI_SUFFIX}"

    @staticmethod
    def normalized(image_key: str) -> str:
        """Name of the stain-normalised copy of an image element."""
        return f"{image_key}{Key.NORMALIZED_SUFFIX}"

    @staticmethod
    def tissue(image_key: str) -> str:
        """Name of the tissue mask (labels) of an image element, as squidpy's ``detect_tissue`` names it."""
        return f"{image_key}{Key.TISSUE_SUFFIX}"

    @staticmethod
    def keyed(record: str, key_added: str, default: str) -> str:
        """Name of the ``.uns["bitro"]`` record of a function with ``key_added``, one per ``key_added``.

        ``record`` itself for the default ``key_added`` (where it always was), ``"{record}_{key_added}"`` for any
        other, so that calls with different ``key_added`` keep their own records (as scanpy's ``uns["neighbors"]``
        and ``uns[key_added]``). E.g. ``Key.keyed(Key.PHENOTYPES, key_added, Key.PHENOTYPE)``.
        """
        return record if key_added == default else f"{record}_{key_added}"

    @staticmethod
    def microns(coordinate_system: str) -> str:
        """Name of the micrometre coordinate system paired with a pixel coordinate system."""
        return f"{coordinate_system}{Key.MICRONS_SUFFIX}"
