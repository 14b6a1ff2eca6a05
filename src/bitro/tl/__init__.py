"""bitro.tl."""
