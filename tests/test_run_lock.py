"""One process per run folder (issue 19, point 2): explain, report, heatmaps and spray hold RUN/run.lock; a second
one is refused in one line naming the holder, before it writes; locks of dead processes are recovered.

The holders are real second processes. They load only the lock's modules (a bare `lrp_module` package, so that
torch is not imported): a holder starts in a fraction of a second, even on a loaded machine."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.layout import RunLayout
from pipeline.output_checks import check_out_placement
from pipeline.run_lock import Holder, RunLockError, hold_run

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
LIGHT = f"""
import sys, time, types
from pathlib import Path
package = types.ModuleType("lrp_module")
package.__path__ = [{str(ROOT / "lrp_module")!r}]
sys.modules["lrp_module"] = package
sys.path.insert(0, {str(ROOT)!r})
from pipeline.run_lock import RunLockError, hold_run
"""


def _python(script: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LIGHT + textwrap.dedent(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@contextmanager
def _holder(folder: Path, purpose: str = "explain"):
    """A second process that takes `folder`'s lock and keeps it until it is killed."""
    process = _python(f"""
        with hold_run({str(folder)!r}, {purpose!r}):
            print("held", flush=True)
            time.sleep(100)
    """)
    try:
        assert process.stdout.readline().strip() == "held", process.stderr.read()
        yield process
    finally:
        process.kill()
        process.wait()


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _write_lock(folder: Path, **fields) -> Path:
    """A lock file as a process with these fields would have left it."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "start": None, "boot": None, "since": "earlier",
              "purpose": "explain", "command": "python -m pipeline explain", "token": "0123", **fields}
    lock = RunLayout(folder).lock
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps(holder))
    return lock


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale-lock"])
def test_processes_racing_on_one_folder_one_holds_it_the_others_are_refused_naming_it(tmp_path, stale):
    out = tmp_path / "run"
    go = tmp_path / "go"
    if stale:  # all four find a killed process's lock and recover it at once: still only one holds the folder
        _write_lock(out, start="1")
    racers = [_python(f"""
        print("ready", flush=True)
        while not Path({str(go)!r}).exists():
            time.sleep(0.001)
        try:
            with hold_run({str(out)!r}, "explain"):
                print("held", flush=True)
                time.sleep(3)
        except RunLockError as error:
            print(f"refused: {{error}}", flush=True)
    """) for _ in range(4)]
    try:
        assert all(racer.stdout.readline().strip() == "ready" for racer in racers)
        go.touch()
        results = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    finally:
        for racer in racers:
            racer.kill()
            racer.wait()
    held = [racer.pid for racer, result in zip(racers, results, strict=True) if result == "held"]
    refused = [result for result in results if result.startswith("refused: ")]
    assert len(held) == 1 and len(refused) == 3, results
    assert all(f"is in use: explain by pid {held[0]} on host {socket.gethostname()}" in r for r in refused)
    assert not out.exists() or not any(out.iterdir())  # released (the folder stays if a refused process made it:
    # that one cannot remove it while the holder's lock is in it)


def test_refusal_is_one_line_naming_the_holder_and_changes_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with _holder(tmp_path, "spray") as holder:
        lock = RunLayout(tmp_path).lock
        before = lock.read_text()
        with pytest.raises(RunLockError) as refused:
            with hold_run(tmp_path, "explain"):
                pytest.fail("the lock was taken twice")
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"{tmp_path} is in use: spray by pid {holder.pid} on host {socket.gethostname()}, "
                                  "since ")
        assert "wait for it to finish or use another run directory" in message
        assert lock.read_text() == before and _listing(tmp_path) == ["notes.txt", "run.lock"]
    assert _listing(tmp_path) == ["notes.txt", "run.lock"]  # the killed holder's lock stays ...
    with hold_run(tmp_path, "explain"):  # ... until the next run recovers it
        assert Holder.parse(lock.read_text()).pid == os.getpid()
    assert _listing(tmp_path) == ["notes.txt"]


def test_lock_of_a_killed_process_is_recovered(tmp_path, capsys):
    with _holder(tmp_path) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        dead = holder.pid
    lock = RunLayout(tmp_path).lock
    assert Holder.parse(lock.read_text()).pid == dead
    with hold_run(tmp_path, "report") as taken:
        assert taken.holder.pid == os.getpid() and Holder.parse(lock.read_text()).purpose == "report"
    assert not lock.exists()
    assert f"removed the stale lock {lock} of explain by pid {dead}" in capsys.readouterr().err


def test_lock_of_a_reused_pid_or_an_earlier_boot_is_recovered(tmp_path):
    # this very process, alive, but not the one that took the lock: another start time, or another boot
    mine = Holder.this_process("explain")
    assert mine.start is not None, "no /proc here: the reuse of a pid cannot be told"
    for fields in ({"start": str(int(mine.start) + 1), "boot": mine.boot},
                   {"start": mine.start, "boot": "an-earlier-boot"}):
        lock = _write_lock(tmp_path, **fields)
        assert not Holder.parse(lock.read_text()).is_running()
        with hold_run(tmp_path, "explain") as taken:
            assert Holder.parse(lock.read_text()).token == taken.holder.token != "0123"
        assert not lock.exists()
    lock = _write_lock(tmp_path, start=mine.start, boot=mine.boot)  # really this process: held
    with pytest.raises(RunLockError, match=f"in use: explain by pid {os.getpid()}"):
        with hold_run(tmp_path, "explain"):
            pass
    assert lock.exists()


def test_lock_of_another_host_is_refused_saying_how_to_remove_it(tmp_path):
    lock = _write_lock(tmp_path, host="node-7", pid=1)
    with pytest.raises(RunLockError) as refused:
        with hold_run(tmp_path, "explain"):
            pass
    assert str(refused.value) == (f"{tmp_path} is in use: explain by pid 1 on host node-7, since earlier: python -m "
                                  "pipeline explain; it runs on another host, so this one cannot tell whether it "
                                  f"still does: if it does not, remove {lock}")
    assert lock.exists()


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_lock_is_released_on_an_exception_and_on_ctrl_c(tmp_path, error):
    out = tmp_path / "new" / "run"
    with pytest.raises(error):
        with hold_run(out, "explain"):
            assert RunLayout(out).lock.is_file()
            raise error()
    assert _listing(tmp_path) == []  # the lock and the folders made for it: nothing else was written
    with hold_run(out, "explain"):
        (out / "run.json").write_text("{}")
    assert _listing(tmp_path) == ["new", "new/run", "new/run/run.json"]  # a folder the run wrote into stays


def test_the_lock_is_the_runs_own_file_which_overwrite_leaves_to_its_holder(tmp_path):
    layout = RunLayout(tmp_path)
    with hold_run(tmp_path, "explain"):
        layout.run_file.write_text("{}")
        assert layout.lock in set(layout.own_files())
        layout.remove_own()
        assert _listing(tmp_path) == ["run.lock"]
    dataset = tmp_path.parent / f"{tmp_path.name}-images"
    dataset.mkdir()
    _write_lock(tmp_path)  # what a run killed before it wrote run.json leaves: not a folder of the user's
    check_out_placement(tmp_path, str(dataset), is_run=False)


def test_a_reader_locks_only_runs_and_reads_one_it_cannot_write_unlocked_unless_it_is_in_use(tmp_path, monkeypatch):
    mine = tmp_path / "photos"
    mine.mkdir()
    with hold_run(mine, "report", create=False) as lock:  # not a run (the reader refuses it): nothing written
        assert lock.holder is None and _listing(mine) == []
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with _holder(run):
        monkeypatch.setattr(os, "link", read_only)
        with pytest.raises(RunLockError, match="is in use: explain by pid"):
            with hold_run(run, "report", create=False):
                pass
    with hold_run(run, "report", create=False) as lock:  # read-only, the killed holder's lock stale: unlocked
        assert lock.holder is None
    assert _listing(run) == ["run.json"]  # the stale lock was removed (this test's os.link is all that fails)


def _png_folder(folder: Path) -> Path:
    folder.mkdir()
    for index in range(2):
        Image.new("RGB", (40, 40), (index * 100, 50, 50)).save(folder / f"{index}.png")
    return folder


def test_explain_report_and_spray_are_refused_while_another_process_holds_the_run(tmp_path, capsys):
    dataset = _png_folder(tmp_path / "images")
    out, cache = tmp_path / "run", tmp_path / "cache"
    with _holder(out) as holder:  # an explain that has just begun: OUT holds only its lock
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            codes = [cli_main(["explain", "--dataset", str(dataset), "--model", "vgg11", "--weights", "random",
                               "--size", "32", "--out", str(out), "--cache", str(cache), "--no-progress"]),
                     cli_main(["report", str(out)]), cli_main(["heatmaps", str(out), "--ids", "0"]),
                     cli_main(["spray", str(out), "--no-progress"])]
        assert codes == [2, 2, 2, 2]
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 4 and all(line.startswith(f"error: {out} is in use: explain by pid {holder.pid} ")
                                       for line in lines), lines
        assert _listing(out) == ["run.lock"] and not cache.exists()  # nothing written
