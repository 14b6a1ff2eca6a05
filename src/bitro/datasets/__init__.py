"""bitro.datasets: the real HER2ST sections (bundled), the HER2ST expression atlas and synthetic data (also written as Space Ranger folders)."""

from bitro.datasets._atlas import her2st_atlas
from bitro.datasets._her2st import her2st, her2st_genes
from bitro.datasets._synthetic import synthetic
from bitro.datasets._visium import synthetic_visium

__all__ = ["her2st", "her2st_atlas", "her2st_genes", "synthetic", "synthetic_visium"]
