"""The dataset explanation pipeline (issue #4). Built so far: per-image statistics (`stats`). Not built yet:
dataset layouts, preprocessing, the Ray driver and actors, the HDF5 / Parquet writers, `make explain`."""
