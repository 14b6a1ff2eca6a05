"""bitro.pp."""
