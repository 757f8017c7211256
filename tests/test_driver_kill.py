"""The driver SIGKILLed mid-run (its whole session: the CLI, its local Ray, the actors): every file under a
final name is complete, there is no _SUCCESS; the same command again finishes the job, and its maps, statistics
(timing aside) and failures equal those of an uninterrupted run, with no image twice."""
from __future__ import annotations

import h5py
import pyarrow.parquet as pq
import pytest

from bench.fault_tools import cli, cli_env, committed_stats, kill_session, make_images, start, wait_for

from .fault_tools import assert_exactly_once, assert_same_outputs

pytestmark = pytest.mark.timeout(600)
IMAGES, SHARDS = 40, 10


def _run_to_end(command, log, timeout_s=300) -> int:
    process = start(command, cli_env(), log)
    try:
        return process.wait(timeout_s)
    finally:
        kill_session(process.pid)


def _assert_complete_files(out):
    """Every shard file under its final name opens and agrees with its siblings."""
    for h5 in (out / "relevance").glob("shard-*.h5"):
        with h5py.File(h5, "r") as handle:
            assert handle["relevance"].shape[0] == handle["image_id"].shape[0]
    for failures in (out / "failures").glob("shard-*.parquet"):
        pq.read_table(failures)
    for stats in committed_stats(out):  # a committed shard: all three files, consistent
        rows = pq.read_table(stats).num_rows
        with h5py.File(out / "relevance" / stats.with_suffix(".h5").name, "r") as handle:
            assert handle["relevance"].shape[0] == rows
        assert rows + pq.read_table(out / "failures" / stats.name).num_rows == IMAGES // SHARDS


def test_driver_killed_mid_run_resumes_to_identical_outputs(tmp_path, artifact_cache):
    dataset = make_images(tmp_path / "images", IMAGES, broken=(7,))
    cache = artifact_cache  # the session's: the artifact is built once, not in this test
    reference = tmp_path / "reference"
    assert _run_to_end(cli(dataset, reference, cache, "--actors", "1"), tmp_path / "reference.log") == 1

    out = tmp_path / "killed"
    command = cli(dataset, out, cache, "--actors", "1")
    driver = start(command, cli_env(), tmp_path / "killed.log")
    try:
        wait_for(lambda: len(committed_stats(out)) >= 2 or driver.poll() is not None, 300, "two committed shards",
                 poll_s=0.02)
    finally:
        kill_session(driver.pid)
    driver.wait(30)
    committed = len(committed_stats(out))
    assert 2 <= committed < SHARDS, f"the kill came too late ({committed} shards committed)"
    assert not (out / "_SUCCESS").exists() and not (out / "manifest.json").exists()
    assert (out / "run.lock").is_file()  # the killed driver's lock: stale, recovered by the same command
    _assert_complete_files(out)

    assert _run_to_end(command, tmp_path / "rerun.log") == 1  # one broken image
    assert (out / "_SUCCESS").exists() and not list(out.rglob(".tmp-*")) and not (out / "run.lock").exists()
    assert_exactly_once(out, IMAGES)
    assert_same_outputs(out, reference)
