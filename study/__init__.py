"""Dataset studies: a manifest of items in, per-item maps and scores, tables and the chosen ranges out."""
