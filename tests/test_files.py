"""lrp_module.files: atomic writes leave nothing behind on failure and name the file in one line; the report's
unfinished index.html (a report killed at the rename) carries the standard temporary name, so a run's sweep and
--overwrite find it, while a user's look-alike file stays."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.synthetic_run import stats_table, synthesise_run
from lrp_module.files import OutputError, atomic, sha256_file, temporary_name, write_text_atomic
from pipeline.layout import RunLayout

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent


def test_atomic_commits_only_a_complete_file(tmp_path):
    target = tmp_path / "result.json"
    with atomic(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name == temporary_name(target.name)
        tmp.write_text("complete")
        assert not target.exists()
    assert target.read_text() == "complete" and sorted(tmp_path.iterdir()) == [target]


def test_atomic_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "result.json"
    with pytest.raises(ValueError, match="half-way"):
        with atomic(target) as tmp:
            tmp.write_text("half")
            raise ValueError("half-way")
    assert list(tmp_path.iterdir()) == []


def test_atomic_keeps_the_previous_file_when_a_rewrite_fails(tmp_path):
    target = tmp_path / "result.json"
    write_text_atomic(target, "first")
    with pytest.raises(RuntimeError):
        with atomic(target) as tmp:
            tmp.write_text("second, unfinished")
            raise RuntimeError
    assert target.read_text() == "first" and sorted(tmp_path.iterdir()) == [target]


def test_a_write_into_a_missing_folder_is_an_output_error_naming_the_file(tmp_path):
    target = tmp_path / "missing" / "index.html"
    with pytest.raises(OutputError) as caught:
        write_text_atomic(target, "page")
    assert str(caught.value) == f"cannot write {target}: No such file or directory"
    assert isinstance(caught.value.__cause__, FileNotFoundError) and list(tmp_path.iterdir()) == []


def test_sha256_file_is_the_digest_of_the_bytes(tmp_path):
    import hashlib

    path = tmp_path / "weights.bin"
    data = bytes(range(256)) * 5000  # more than one chunk
    path.write_bytes(data)
    assert sha256_file(path, chunk=4096) == hashlib.sha256(data).hexdigest()


def test_a_report_killed_at_the_rename_leaves_a_folder_the_next_report_removes(tmp_path):
    """The report is built in a temporary folder beside RUN/report (pipeline/output_set.py): killed there, it leaves
    no RUN/report at all, and the next report removes that folder; a user's files that merely look temporary stay."""
    from pipeline.report import build_report

    run = synthesise_run(tmp_path / "run", stats_table(6, 2, ["/nowhere/x.jpg"], size=16, shard_size=8), size=16,
                         shard_size=8)
    layout = RunLayout(run)
    for folder in (layout.heatmaps, layout.spray):  # a user's files that merely look temporary
        folder.mkdir(exist_ok=True)
        (folder / ".tmp-notes.txt").write_text("mine")
    script = textwrap.dedent(f"""
        import os, sys
        import lrp_module.files as files
        from pipeline.report import build_report

        def killed(source, target):  # the process dies between writing and renaming
            if str(target).endswith("index.html"):
                sys.stdout.write(str(source)); sys.stdout.flush(); os._exit(9)
            os.rename(source, target)

        files.os.replace = killed
        build_report({str(run)!r}, gallery=2)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert result.returncode == 9, result.stderr
    left = Path(result.stdout)
    assert left.is_file() and left.parent.parent == run and left.parent.name.startswith(".tmp-")
    assert not layout.report.exists()
    build_report(run, gallery=2)
    assert not left.parent.exists() and (layout.report / "index.html").is_file()
    layout.sweep_temporary()
    assert all((folder / ".tmp-notes.txt").read_text() == "mine" for folder in (layout.heatmaps, layout.spray))


def test_the_sweep_covers_every_folder_the_run_and_its_report_write_to(tmp_path):
    layout = RunLayout(tmp_path)
    layout.make_folders()
    left = [tmp_path / sub / temporary_name(name) for sub, name in (
        ("relevance", "shard-00001.h5"), ("report", "index.html"), ("report/img", "a-heatmap.png"),
        ("heatmaps", "a-overlay.png"), ("spray", "summary.json"), (".", "manifest.json"))]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("unfinished")
    own = list(layout.own_files())
    assert sorted(own) == sorted(left) and len(own) == len(set(own))
    layout.sweep_temporary()
    assert not any(p.exists() for p in left)


def test_a_full_disk_reported_by_hdf5_is_an_output_error_other_errors_are_not(tmp_path):
    """h5py raises RuntimeError (not OSError) when HDF5 cannot flush its metadata to a full disk: that is a write
    error naming the file, with nothing left behind; any other RuntimeError stays what it is."""
    target = tmp_path / "shard.h5"
    with pytest.raises(OutputError, match=r"cannot write .*shard\.h5: no space left on device"):
        with atomic(target) as tmp:
            tmp.write_bytes(b"x")
            raise RuntimeError("Unable to flush file's cached information (file write failed: errno = 28, "
                               "error message = 'No space left on device')")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="something else"):
        with atomic(target):
            raise RuntimeError("something else")
