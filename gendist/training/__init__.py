"""One training loop per model family, sharing run-folder, data and resume plumbing (common.py)."""
