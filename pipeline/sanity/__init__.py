"""The model parameter randomisation test (MPRT, Adebayo et al. 2018) and its efficient variant (eMPRT, Hedström
et al. 2023) over a sample of a finished run's images: `python -m pipeline sanity RUN --images N` (docs/sanity.md)."""
