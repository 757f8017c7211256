"""`make bench-spray`: our SpRAy against corelay 1.0.0's, side by side on the same synthetic maps of one class
(planted groups, 64x64, bench/spray_maps.py) with the same preprocessing (|R|, sum-pool to 32x32, divide by the sum),
the same kNN graph (10 neighbours), 32 eigenpairs, k-means for k = 2..8 and a t-SNE; each in a fresh process (corelay
in its own virtual environment), timed end to end with its peak memory. Then 100,000 maps of one class, which
corelay's dense N x N distances cannot hold, through ours only: the class task exactly as `make spray` runs it
(maps streamed from HDF5 shards, kNN graph, spectrum, k-means, Ward, t-SNE, cluster mean maps; above
graph.LARGE_CLASS images the reduced-space neighbours and sampled Ward), with two threads. And at 20,000 maps the
large-class path against the exact one: neighbour recall and clustering ARI. Prints a table and writes
bench/results/spray_speed.json.

    python -m bench.spray_speed [--maps 5000] [--large 100000] [--agreement 20000] [--skip-large]
                                [--skip-compare] [--skip-agreement] [--corelay-python PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.spray_corelay_child import rss_mb  # standalone there (corelay's environment), shared here

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "spray_speed.json"
CORELAY_PYTHON = ROOT / ".venv-bench-corelay" / "bin" / "python"
SIZE, GROUPS, K_MIN, K_MAX = 64, 4, 2, 8
SHARES = np.array([0.4, 0.3, 0.2, 0.1])


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time of this process: on a machine shared with other jobs, the wall time's honest companion."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 1)


def child_ours(maps_file: str, out_file: str, threads: int, picture: bool) -> dict:
    """Ours on the maps of an HDF5 file, read in pieces of 1,024 (as the shards are streamed)."""
    import h5py

    from pipeline.spray.analyse import SprayParams, analyse_class
    from pipeline.spray.features import features

    baseline = rss_mb()
    started = time.perf_counter()
    with h5py.File(maps_file, "r") as handle:
        maps = handle["relevance"]
        vectors = np.concatenate([features(maps[i:i + 1024], 32, "absspectral").vectors
                                  for i in range(0, len(maps), 1024)])
    result = analyse_class(vectors, SprayParams(k_max=K_MAX, agglomerative=False, embedding=picture), threads)
    seconds = time.perf_counter() - started
    np.savez(out_file, eigenvalues=result.eigenvalues, **{f"k{k}": labels for k, labels in result.kmeans.items()})
    return {"seconds": seconds, "cpu_seconds": cpu_seconds(), "peak_rss_mb": peak_mb(), "baseline_rss_mb": baseline,
            "added_peak_mb": peak_mb() - baseline, "steps": result.seconds, "k_chosen": result.k_chosen}


def child_large(run_dir: str, threads: int) -> dict:
    """One class task of `make spray` (pipeline/spray/run.py's analyse_one) on the synthetic run, in this process."""
    from pipeline.spray.inputs import open_run_index
    from pipeline.spray.run import SprayOptions, analyse_one

    baseline = rss_mb()
    started = time.perf_counter()
    index = open_run_index(run_dir)
    result = analyse_one(run_dir, 0, index.table, SprayOptions(), threads)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "cpu_seconds": cpu_seconds(), "peak_rss_mb": peak_mb(), "baseline_rss_mb": baseline,
            "added_peak_mb": peak_mb() - baseline, "steps": result.seconds, "k_chosen": result.analysis.k_chosen,
            "images": len(result.rows), "labels": result.analysis.kmeans[GROUPS].tolist(),
            "ward_labels": result.analysis.agglomerative[GROUPS].tolist()}


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings, to 4 decimals."""
    from sklearn.metrics import adjusted_rand_score

    return round(float(adjusted_rand_score(a, b)), 4)


def child_agreement(n: int, threads: int) -> dict:
    """The large-class path (reduced neighbours, sampled Ward) against the exact one on the same n planted maps."""
    from bench.spray_maps import planted_maps
    from pipeline.spray import graph
    from pipeline.spray.analyse import SprayParams, analyse_class
    from pipeline.spray.features import features

    maps, truth = planted_maps(n, GROUPS, SIZE, shares=SHARES)
    vectors = features(maps, 32, "absspectral").vectors
    del maps
    timed = {}
    for name, large in (("exact", n), ("large_path", 0)):
        started = time.perf_counter()
        timed[name] = graph.nearest_neighbours(vectors, 10, threads, large=large)
        timed[f"{name}_seconds"] = round(time.perf_counter() - started, 2)
    out = {"maps": n, "threads": threads, "reduced_dims": graph.REDUCED_DIMS,
           "candidates_per_neighbour": graph.CANDIDATES,
           "neighbour_recall": round(graph.neighbour_recall(timed["large_path"], timed["exact"]), 5),
           "neighbours_seconds": {"exact": timed["exact_seconds"], "large_path": timed["large_path_seconds"]}}
    params = dict(k_max=K_MAX, embedding=False)
    exact = analyse_class(vectors, SprayParams(**params, large_class=n), threads)
    fast = analyse_class(vectors, SprayParams(**params, large_class=0), threads)
    ks = sorted(exact.kmeans)
    out.update({
        "k_chosen": {"exact": exact.k_chosen, "large_path": fast.k_chosen},
        "ari_kmeans_large_vs_exact": {k: ari(exact.kmeans[k], fast.kmeans[k]) for k in ks},
        "ari_ward_large_vs_exact": {k: ari(exact.agglomerative[k], fast.agglomerative[k]) for k in ks},
        "ari_vs_truth_k4": {"exact_kmeans": ari(truth, exact.kmeans[GROUPS]),
                            "large_kmeans": ari(truth, fast.kmeans[GROUPS]),
                            "exact_ward": ari(truth, exact.agglomerative[GROUPS]),
                            "large_ward": ari(truth, fast.agglomerative[GROUPS])},
        "eigenvalues_max_difference_first_8":
            round(float(np.abs(exact.eigenvalues[:8] - fast.eigenvalues[:8]).max()), 5),
        "steps": {"exact": exact.seconds, "large_path": fast.seconds},
    })
    return out


def _thread_env(threads: int) -> dict:
    """The environment with BLAS and OpenMP held to `threads` (both sides alike; on a loaded machine OpenMP's
    spinning threads make more threads slower, not faster)."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    return {**os.environ, **{name: str(threads) for name in names}}


def _run_child(command: list[str], env: dict, timeout: float = 3600) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])}... failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_large_run(root: Path, n: int) -> np.ndarray:
    """A synthetic run of n planted maps (float16, shards of 1,024), all predicted class 0; returns their groups."""
    from bench.spray_maps import planted_map
    from bench.synthetic_run import stats_table, synthesise_run

    table = stats_table(n, 1, ["x.jpg"], shard_size=1024, size=SIZE)
    groups = np.zeros(n, np.int64)

    def map_of(i: int) -> np.ndarray:
        relevance, groups[i] = planted_map(i, GROUPS, SIZE, shares=SHARES)
        return relevance

    synthesise_run(root, table, size=SIZE, shard_size=1024, map_of=map_of)
    return groups


def compare(n: int, corelay_python: Path, threads: int, picture: bool) -> dict:
    """Both on the same n maps; `picture`: with the t-SNE (ours of a 1,000-image sample, corelay's of all)."""
    import h5py

    from bench.spray_maps import planted_maps

    with tempfile.TemporaryDirectory(prefix="bench-spray-") as tmp:
        maps, truth = planted_maps(n, GROUPS, SIZE, shares=SHARES)
        maps_file, shard_file = Path(tmp) / "maps.npy", Path(tmp) / "maps.h5"
        np.save(maps_file, maps)  # corelay takes the whole array
        with h5py.File(shard_file, "w") as handle:  # ours streams it, as from the run's shards
            handle.create_dataset("relevance", data=maps, chunks=(1, SIZE, SIZE))
        del maps
        flag = [] if picture else ["--no-tsne"]
        ours = _run_child([sys.executable, "-m", "bench.spray_speed", "--child", "ours", str(shard_file),
                           str(Path(tmp) / "ours.npz"), "--threads", str(threads), *flag], _thread_env(threads))
        env = {k: v for k, v in _thread_env(threads).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        theirs = _run_child([str(corelay_python), str(ROOT / "bench" / "spray_corelay_child.py"), str(maps_file),
                             str(Path(tmp) / "corelay.npz"), str(K_MIN), str(K_MAX), *flag], env=env)
        a, b = np.load(Path(tmp) / "ours.npz"), np.load(Path(tmp) / "corelay.npz")
        ks = range(K_MIN, K_MAX + 1)
        return {
            "maps": n, "groups": GROUPS, "map_size": SIZE, "threads": threads, "picture": picture,
            "ours": ours, "corelay": theirs,
            "ari_ours_vs_corelay_leading_k": {k: ari(a[f"k{k}"], b[f"leading{k}"]) for k in ks},
            "ari_ours_vs_corelay_all_32": {k: ari(a[f"k{k}"], b[f"k{k}"]) for k in ks},
            "ari_vs_truth": {"ours": ari(truth, a[f"k{GROUPS}"]),
                             "corelay_leading_k": ari(truth, b[f"leading{GROUPS}"]),
                             "corelay_all_32": ari(truth, b[f"k{GROUPS}"])},
            "eigenvalues_max_difference":
                float(np.abs(np.sort(a["eigenvalues"])[:8] - np.sort(b["eigenvalues"])[:8]).max()),
            "speedup": round(theirs["seconds"] / ours["seconds"], 2),
            "peak_memory_ratio": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3),
            "added_memory_ratio": round(ours["added_peak_mb"] / max(theirs["added_peak_mb"], 1e-9), 3),
        }


def large(n: int, threads: int) -> dict:
    from sklearn.metrics import adjusted_rand_score

    with tempfile.TemporaryDirectory(prefix="bench-spray-large-") as tmp:
        begun = time.perf_counter()
        truth = write_large_run(Path(tmp) / "run", n)
        written = time.perf_counter() - begun
        result = _run_child([sys.executable, "-m", "bench.spray_speed", "--child", "large", str(Path(tmp) / "run"),
                             "--threads", str(threads)], _thread_env(threads))
    labels, ward = np.asarray(result.pop("labels")), np.asarray(result.pop("ward_labels"))
    result.update({"maps": n, "map_size": SIZE, "threads": threads, "write_run_seconds": round(written, 1),
                   "ari_vs_truth": round(float(adjusted_rand_score(truth, labels)), 4),
                   "ward_ari_vs_truth": round(float(adjusted_rand_score(truth, ward)), 4)})
    return result


def table(report: dict) -> str:
    lines = ["| run | maps | seconds | peak RSS MB | added peak MB | ARI vs truth (k=4) |", "|---|---|---|---|---|---|"]
    for key, what in (("compare", "with the t-SNE picture"), ("compare_without_picture", "without the picture")):
        small = report.get(key)
        for name in ("ours", "corelay") if small else ():
            r = small[name]
            truth = small["ari_vs_truth"]
            score = truth["ours"] if name == "ours" else \
                f"{truth['corelay_leading_k']} (all 32: {truth['corelay_all_32']})"
            lines.append(f"| {name}, {what} | {small['maps']:,} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['added_peak_mb']:.0f} | {score} |")
    big = report.get("large")
    if big:
        lines.append(f"| ours, one `make spray` class task | {big['maps']:,} | {big['seconds']:.1f} | "
                     f"{big['peak_rss_mb']:.0f} | {big['added_peak_mb']:.0f} | {big['ari_vs_truth']} |")
    agree = report.get("agreement")
    if agree:
        lines.append("")
        lines.append(f"agreement at {agree['maps']:,} maps, large-class path vs exact: neighbour recall "
                     f"{agree['neighbour_recall']}, neighbours {agree['neighbours_seconds']['exact']} s -> "
                     f"{agree['neighbours_seconds']['large_path']} s, k* {agree['k_chosen']}, ARI k-means by k "
                     f"{agree['ari_kmeans_large_vs_exact']}, ARI Ward by k {agree['ari_ward_large_vs_exact']}")
    for key in ("compare", "compare_without_picture"):
        small = report.get(key)
        if not small:
            continue
        lines.append("")
        lines.append(f"{key}: speed-up {small['speedup']}x, peak memory {small['peak_memory_ratio']}x corelay's "
                     f"(added above the imports: {small['added_memory_ratio']}x); ARI ours vs corelay (k leading "
                     "eigenvectors) by k: "
                     + ", ".join(f"{k}: {v}" for k, v in small["ari_ours_vs_corelay_leading_k"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spray_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=5000, help="maps of the side-by-side run (default 5000)")
    parser.add_argument("--large", type=int, default=100_000, help="maps of the large run (default 100000)")
    parser.add_argument("--skip-large", action="store_true", help="only the side-by-side run")
    parser.add_argument("--skip-compare", action="store_true", help="no side-by-side run with corelay")
    parser.add_argument("--agreement", type=int, default=20_000, help="maps of the large-path-vs-exact run (20000)")
    parser.add_argument("--skip-agreement", action="store_true", help="no large-path-vs-exact run")
    parser.add_argument("--threads", type=int, default=1, help="BLAS / OpenMP threads of both sides (default 1)")
    parser.add_argument("--large-threads", type=int, default=2, help="threads of the large and agreement runs (2)")
    parser.add_argument("--corelay-python", default=str(CORELAY_PYTHON), help="python of corelay's environment")
    parser.add_argument("--child", choices=("ours", "large", "agreement"), help=argparse.SUPPRESS)
    parser.add_argument("--no-tsne", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "ours":
        print(json.dumps(child_ours(args.paths[0], args.paths[1], args.threads, not args.no_tsne)))
        return 0
    if args.child == "large":
        print(json.dumps(child_large(args.paths[0], args.threads)))
        return 0
    if args.child == "agreement":
        print(json.dumps(child_agreement(int(args.paths[0]), args.threads)))
        return 0
    report = {"machine": f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d")}
    if not args.skip_compare:
        if not Path(args.corelay_python).is_file():
            parser.error(f"{args.corelay_python} is missing: `make bench-spray` builds corelay's environment")
        report["compare"] = compare(args.maps, Path(args.corelay_python), args.threads, picture=True)
        report["compare_without_picture"] = compare(args.maps, Path(args.corelay_python), args.threads, picture=False)
    if not args.skip_agreement:
        report["agreement"] = _run_child([sys.executable, "-m", "bench.spray_speed", "--child", "agreement",
                                          str(args.agreement), "--threads", str(args.large_threads)],
                                         _thread_env(args.large_threads))
    if not args.skip_large:
        report["large"] = large(args.large, args.large_threads)
    print(table(report))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    previous.update(report)
    RESULTS.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"-> {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
