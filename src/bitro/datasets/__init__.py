"""bitro.datasets."""
