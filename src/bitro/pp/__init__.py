"""bitro.pp: preprocessing of H&E sections into a cell table."""

from bitro.pp._cells import extract_cells
from bitro.pp._graph import spatial_graph
from bitro.pp._patches import spot_patches
from bitro.pp._phenotypes import phenotypes
from bitro.pp._pseudo_spots import pseudo_spots
from bitro.pp._segment import load_segmentation, segment_nuclei
from bitro.pp._stain import normalize_stain
from bitro.pp._virtual import virtual_spots

__all__ = [
    "extract_cells",
    "load_segmentation",
    "normalize_stain",
    "phenotypes",
    "pseudo_spots",
    "segment_nuclei",
    "spatial_graph",
    "spot_patches",
    "virtual_spots",
]
