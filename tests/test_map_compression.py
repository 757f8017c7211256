"""Maps compressed in worker threads (writers.compress_map) are stored exactly as h5py's own shuffle + gzip
filters store them: same values, same chunk bytes, readable by any HDF5 reader."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.writers import compress_map, write_relevance


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("level", [0, 4, 9])
def test_precompressed_chunks_equal_h5pys_filters(tmp_path, dtype, level):
    maps = (np.random.default_rng(0).standard_normal((4, 40, 56)) * 1e-3).astype(np.float32)
    maps[1] = 0.0
    columns = {"image_id": [f"img{i}" for i in range(4)]}
    write_relevance(tmp_path / "filters.h5", maps, columns, {}, dtype, level)
    write_relevance(tmp_path / "threads.h5", maps, columns, {}, dtype, level,
                    chunks=[compress_map(m, dtype, level) for m in maps])
    with h5py.File(tmp_path / "filters.h5") as a, h5py.File(tmp_path / "threads.h5") as b:
        ours, theirs = b["relevance"], a["relevance"]
        assert (ours.dtype, ours.chunks, ours.compression, ours.compression_opts, ours.shuffle) == \
            (theirs.dtype, theirs.chunks, theirs.compression, theirs.compression_opts, theirs.shuffle)
        assert np.array_equal(ours[:], maps.astype(dtype))
        for i in range(4):
            assert ours.id.read_direct_chunk((i, 0, 0)) == theirs.id.read_direct_chunk((i, 0, 0))


def test_chunk_count_must_match(tmp_path):
    maps = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(ValueError, match="1 compressed chunks for 2 maps"):
        write_relevance(tmp_path / "x.h5", maps, {}, {}, chunks=[compress_map(maps[0])])
    assert not (tmp_path / "x.h5").exists()
