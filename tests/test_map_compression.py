"""Maps compressed in worker threads (writers.compress_map) are stored exactly as h5py's own shuffle + gzip
filters store them: same values, same chunk bytes, readable by any HDF5 reader."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.layout import RunLayout
from pipeline.writers import compress_map, write_relevance, write_virtual_dataset


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


def test_virtual_dataset_says_it_reads_the_shards(tmp_path):
    """relevance.h5 names, on the file and on its dataset, the shards it reads and what a copy without them reads
    (NaN fill values), since HDF5 itself reads a missing source as fill values without a word (issue 19.15)."""
    layout = RunLayout(tmp_path / "run")
    maps = np.ones((2, 8, 8), np.float32)
    layout.relevance_shard(0).parent.mkdir(parents=True)
    write_relevance(layout.relevance_shard(0), maps, {"image_id": ["a", "b"]}, {}, "float16", 1)
    write_virtual_dataset(layout.virtual_dataset, [layout.relevance_shard(0)], [2], 8, 8, "float16")
    with h5py.File(layout.virtual_dataset) as handle:
        assert np.array_equal(handle["relevance"][:], maps)
        for node in (handle, handle["relevance"]):
            note = node.attrs["note"]
            assert "relevance/shard-*.h5" in note and "NaN" in note, note
            assert node.attrs["shards"] == "relevance/shard-*.h5"
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "relevance.h5").write_bytes(layout.virtual_dataset.read_bytes())
    with h5py.File(copy / "relevance.h5") as handle:  # what the note warns of
        assert np.isnan(handle["relevance"][:]).all()
