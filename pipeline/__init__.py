"""The dataset explanation pipeline: `python -m pipeline explain` (see README)."""
