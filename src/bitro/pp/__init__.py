"""bitro.pp: preprocessing of H&E sections into a cell table."""

from bitro.pp._cells import extract_cells
from bitro.pp._graph import spatial_graph
from bitro.pp._phenotypes import phenotypes

__all__ = ["extract_cells", "phenotypes", "spatial_graph"]
