"""bitro.pl."""
