"""Tools for the reliability tests and bench/reliability_soak: tiny generated datasets (with broken, crashing and
hanging images), the Ray processes of a run found and killed by process, process group or session, and run outputs
read back. In bench/, not tests/, because no benchmark imports tests; not in pipeline/, because the pipeline has no
use for them (pipeline/faults.py holds only the fault injection the actors run)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from pipeline.faults import fault_file

ACTOR_TITLE = "ray::ShardExplainer"


def make_images(root: Path, count: int, broken: tuple[int, ...] = (), faults: dict[int, str] | None = None,
                seed: int = 0) -> Path:
    """`count` small PNGs img00000.png...; the positions in `broken` are not images, those in `faults` are
    fault-injection files (crash | hang)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = root / f"img{i:05d}.png"
        pixels = rng.integers(0, 255, (36 + i % 5, 40, 3), dtype=np.uint8)  # drawn for every i: the same images
        if i in broken:
            path.write_bytes(b"not an image")
        elif faults and i in faults:
            path.write_bytes(fault_file(faults[i]))
        else:
            Image.fromarray(pixels).save(path)
    return root


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def descendants(ancestor: int) -> list[int]:
    parents = {pid: _parent(pid) for pid in _pids()}
    found, frontier = [], {ancestor}
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = set(children)
    return found


def actor_processes(ancestor: int | None = None, session: int | None = None) -> list[int]:
    """pids of ShardExplainer actor processes under `ancestor` (a pid) or in `session` (a session id)."""
    candidates = descendants(ancestor) if ancestor is not None else [p for p in _pids() if _sid(p) == session]
    return [pid for pid in candidates if _cmdline(pid).startswith(ACTOR_TITLE)]


def kill_session(session: int) -> None:
    """SIGKILL the process group `session` and every process left in that session (Ray's workers get process
    groups of their own inside the driver's session)."""
    try:
        os.killpg(session, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(3):
        for pid in _pids():
            if _sid(pid) == session:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.2)


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def committed_stats(out: Path) -> list[Path]:
    return sorted((out / "stats").glob("shard-*.parquet")) if (out / "stats").is_dir() else []


def read_run(out: Path) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """All maps in dataset order (through relevance.h5), the statistics without timing sorted by image,
    and the failures sorted by image."""
    with h5py.File(out / "relevance.h5") as handle:
        maps = handle["relevance"][:]
    stats = pd.read_parquet(out / "stats").drop(columns="seconds").sort_values("image_id").reset_index(drop=True)
    failures = pd.read_parquet(out / "failures.parquet").sort_values("image_id").reset_index(drop=True)
    return maps, stats, failures


REPO = Path(__file__).resolve().parent.parent


def cli(dataset: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """`python -m pipeline explain` on a tiny configuration (vgg11, random weights, 32x32, shards of 4)."""
    return [sys.executable, "-m", "pipeline", "explain", "--dataset", str(dataset), "--model", "vgg11",
            "--weights", "random", "--size", "32", "--batch-size", "2", "--shard-size", "4", "--map-dtype",
            "float32", "--out", str(out), "--cache", str(cache), "--no-progress", *extra]


def cli_env(**extra: str) -> dict[str, str]:
    """This checkout first on the path (also for Ray's workers); no inherited RAY_ADDRESS unless given."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process in a session (and process group) of its own, output to `log`."""
    with open(log, "wb") as handle:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
