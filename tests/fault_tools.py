"""Assertions of the reliability tests on run outputs (the tools themselves: bench/fault_tools.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.fault_tools import read_run


def assert_exactly_once(out: Path, image_count: int) -> None:
    """Every image is in the statistics or in the failures, once."""
    _, stats, failures = read_run(out)
    ids = stats.image_id.tolist() + failures.image_id.tolist()
    assert len(ids) == len(set(ids)), "an image is recorded twice"
    assert sorted(ids) == [f"img{i:05d}" for i in range(image_count)], "an image is missing"


def assert_same_outputs(out: Path, reference: Path) -> None:
    """Bit-identical maps, exactly equal statistics (timing aside) and failures."""
    maps, stats, failures = read_run(out)
    ref_maps, ref_stats, ref_failures = read_run(reference)
    assert maps.shape == ref_maps.shape and maps.tobytes() == ref_maps.tobytes(), "the maps differ"
    pd.testing.assert_frame_equal(stats, ref_stats, check_exact=True)
    pd.testing.assert_frame_equal(failures, ref_failures, check_exact=True)


def assert_close_outputs(out: Path, reference: Path, rtol: float = 1e-4) -> None:
    """Maps and statistics equal to float32 rounding (`absorbed`, a difference of near-equal numbers, absolutely),
    failures exactly: what holds when the torch thread count differs, which changes oneDNN's float rounding on some
    CPUs (AVX-512 ones: measured)."""
    maps, stats, failures = read_run(out)
    ref_maps, ref_stats, ref_failures = read_run(reference)
    np.testing.assert_allclose(maps, ref_maps, rtol=rtol, atol=rtol * np.abs(ref_maps).max())
    pd.testing.assert_frame_equal(stats.drop(columns="absorbed"), ref_stats.drop(columns="absorbed"), rtol=rtol)
    np.testing.assert_allclose(stats.absorbed, ref_stats.absorbed, rtol=0, atol=rtol)
    pd.testing.assert_frame_equal(failures, ref_failures, check_exact=True)
