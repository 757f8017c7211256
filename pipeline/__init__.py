"""The dataset explanation pipeline: `python -m pipeline explain` (README, docs/)."""
