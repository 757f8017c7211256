"""A new user's first run: set-up (venv + pinned install, as the Makefile's `.venv/.installed`), then `make explain`'s
command on the sample with a fresh artifact cache, timed by phase: set-up, start-up (imports, configuration), checks,
artifact build, Ray start, explain, finish. The phases inside the run come from the manifest's `timings.phases`; the
load average is recorded beside them (timings on a shared machine move with it).

The precision probe runs in the driver's threads beside the other phases, so its own seconds are not its cost: the
same command runs again with the probe not started (pipeline.run.start_probe replaced), and the probe's cost is the
difference of the two wall times (each with a fresh artifact cache, in alternating order over --pairs), as a share
of the run without it. Prints a table and writes JSON.

    python -m bench.first_run [--skip-setup] [--pairs N] [--python python3] [--dataset sample] [--out PATH]

--skip-setup: the venv exists; set-up is reported as skipped (no number), and the run uses this interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import write_results

DEFAULT_OUT = Path("bench/results/first_run.json")
ROOT = Path(__file__).resolve().parent.parent
# issue 20.4: the probe's cost (wall time with it minus without) <= 10 % of the run's time without it
# and its process's peak memory <= 1.5 GB above the float32 pass's (the actor's peak)
TARGETS = {"probe_share_of_run": 0.10, "probe_memory_mb": 1536.0, "setup_plus_explain_s": 240.0}
ZENNIT = "zennit==1.0.0"  # as the Makefile installs it (--no-deps --ignore-requires-python)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-setup", action="store_true", help="the venv exists: report set-up as skipped")
    parser.add_argument("--python", default="python3", help="the interpreter the fresh venv is made with")
    parser.add_argument("--dataset", default="sample", help="what `make explain` explains (default: the sample)")
    parser.add_argument("--pairs", type=int, default=1, help="runs with and without the probe, alternating")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def setup(python: str, venv: Path) -> float:
    """Seconds to create a venv and install the project as the Makefile's set-up does (pip, -e '.[test]', zennit)."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    started = time.perf_counter()
    for command in ([python, "-m", "venv", str(venv)], [*pip, "--upgrade", "pip"], [*pip, "-e", f"{ROOT}[test]"],
                    [*pip, "--no-deps", "--ignore-requires-python", ZENNIT]):
        subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - started


# `make explain`'s command (pipeline.cli.main), with or without the precision probe (pipeline.run.start_probe
# replaced), printing the driver's peak memory last
RUNNER = ("import sys, pipeline.run as run; from pipeline.cli import main; "
          "from pipeline.precision_probe import peak_rss_mb; "
          "probe = sys.argv.pop(1) == 'probe'; run.start_probe = run.start_probe if probe else lambda *args: None; "
          "code = main(sys.argv[1:]); print('driver_peak_rss_mb', peak_rss_mb(), file=sys.stderr); sys.exit(code)")


def explain(python: str, scratch: Path, dataset: str, probe: bool = True) -> dict:
    """`make explain`'s command (configs/run.yaml's defaults) into a scratch run folder and a fresh artifact cache:
    its wall time, the manifest's phases, the actor's and the driver's peak memory."""
    out, cache = scratch / "run", scratch / "cache"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    arguments = ["explain", "--dataset", dataset, "--out", str(out), "--cache", str(cache), "--no-progress"]
    command = [python, "-c", RUNNER, "probe" if probe else "no-probe", *arguments]
    began = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    ended = time.time()
    if result.returncode != 0:
        raise SystemExit(f"explain exited with {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    invocation, timings = manifest["invocations"][-1], manifest["timings"]
    phases = timings.get("phases")
    if not phases:
        raise SystemExit("the manifest has no timings.phases: this pipeline predates the phase timings")
    inside = invocation["started"] - began  # interpreter start, imports, configuration
    rest = ended - invocation["started"] - phases["before_ray_s"] - phases["ray_start_s"] - phases["explain_s"]
    return {"probe": probe, "wall_s": ended - began, "start_up_s": inside,
            "checks_s": phases["before_ray_s"] - phases["artifact_s"], "artifact_build_s": phases["artifact_s"],
            "ray_start_s": phases["ray_start_s"], "explain_s": phases["explain_s"], "probe_s": phases.get("probe_s"),
            "probe_wait_s": phases.get("probe_wait_s"), "finish_s": rest,
            "probe_images": (manifest.get("precision") or {}).get("images"), "images": manifest["totals"]["images"],
            "actor_peak_rss_mb": timings.get("actor_peak_rss_mb"),
            "driver_peak_rss_mb": float(result.stderr.strip().splitlines()[-1].split()[-1]),
            "probe_peak_rss_mb": timings.get("probe_peak_rss_mb")}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    report: dict = {"cpus": os.cpu_count(), "load_before": _load(), "dataset": args.dataset}
    with tempfile.TemporaryDirectory(prefix="first-run-") as scratch:
        scratch = Path(scratch)
        if args.skip_setup:
            report["setup_s"], python = None, sys.executable
        else:
            report["setup_s"] = setup(args.python, scratch / "venv")
            python = str(scratch / "venv" / "bin" / "python")
        report["load_after_setup"] = _load()
        runs = [explain(python, scratch, args.dataset, probe=(i % 2 == 0) == (pair % 2 == 0))
                for pair in range(args.pairs) for i in range(2)]
    report["load_after"] = _load()
    report["runs"] = runs
    report["run"] = run = next(r for r in runs if r["probe"])
    with_probe = [r["wall_s"] for r in runs if r["probe"]]
    without = [r["wall_s"] for r in runs if not r["probe"]]
    report["probe_cost_s"] = cost = sum(with_probe) / len(with_probe) - sum(without) / len(without)
    share = cost / (sum(without) / len(without))
    # the probe's process against the float32 pass (the actor's peak), as issue 20.4 compares them
    report["probe_memory_mb"] = extra = max(r["probe_peak_rss_mb"] - r["actor_peak_rss_mb"] for r in runs
                                            if r["probe"])
    total = None if report["setup_s"] is None else report["setup_s"] + run["wall_s"]
    report["targets"] = {
        "probe_share_of_run": {"value": share, "target": TARGETS["probe_share_of_run"],
                               "met": share <= TARGETS["probe_share_of_run"]},
        "probe_memory_mb": {"value": extra, "target": TARGETS["probe_memory_mb"],
                            "met": extra <= TARGETS["probe_memory_mb"]},
        "setup_plus_explain_s": {"value": total, "target": TARGETS["setup_plus_explain_s"],
                                 "met": None if total is None else total <= TARGETS["setup_plus_explain_s"]}}
    _print(report)
    write_results(args.out, report)
    return 0


def _print(report: dict) -> None:
    run = report["run"]
    setup_s = report["setup_s"]
    rows = [("set-up (venv + install)", "skipped" if setup_s is None else f"{setup_s:7.1f} s"),
            ("start-up (imports, config)", f"{run['start_up_s']:7.1f} s"),
            ("checks, dataset listing", f"{run['checks_s']:7.1f} s"),
            ("artifact build", f"{run['artifact_build_s']:7.1f} s"),
            ("Ray start", f"{run['ray_start_s']:7.1f} s"),
            ("explain", f"{run['explain_s']:7.1f} s"),
            ("finish (manifest, Ray stop, exit)", f"{run['finish_s']:7.1f} s"),
            ("explain command, wall", f"{run['wall_s']:7.1f} s"),
            (f"probe ({run['probe_images']} image(s) float64), beside the above", f"{run['probe_s']:7.1f} s"),
            ("  waited for after the shards", f"{run['probe_wait_s']:7.1f} s"),
            ("  cost: wall with it - wall without", f"{report['probe_cost_s']:7.1f} s"),
            ("  memory: its process's peak - the actor's", f"{report['probe_memory_mb']:7.0f} MB")]
    print(f"\nfirst run: {run['images']} images ({report['dataset']}), {report['cpus']} CPUs, load before "
          f"{report['load_before']}, after {report['load_after']}; peak memory: actor "
          f"{run['actor_peak_rss_mb']:.0f} MB, driver {run['driver_peak_rss_mb']:.0f} MB, probe "
          f"{run['probe_peak_rss_mb']:.0f} MB")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print("runs (wall s, driver peak MB): " + ", ".join(
        f"{'with' if r['probe'] else 'without'} {r['wall_s']:.1f} {r['driver_peak_rss_mb']:.0f}"
        for r in report["runs"]))
    print("targets:")
    for name, target in report["targets"].items():
        state = {True: "met", False: "MISSED", None: "unmeasured"}[target["met"]]
        value = "-" if target["value"] is None else f"{target['value']:.3g}"
        print(f"  [{state}] {name}: {value} (target {target['target']})")


if __name__ == "__main__":
    sys.exit(main())
