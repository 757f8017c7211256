"""PCX's prototypes at scale: one class of 100,000 synthetic concept-relevance vectors (C = 512, drawn from a known
Gaussian mixture of strategies in the space of normalised relevance), fitted as one `make prototypes` task fits a
class (pipeline/audit/prototypes.py analyse_class: PCA, BIC over 1..8 full-covariance mixtures, scores, deviating
concepts, closest images), in a fresh process: wall time by phase and the process's peak resident memory during the
fit (VmHWM reset once the vectors are generated; it counts Python, NumPy, scikit-learn and the vectors). The
target (issue 22): < 5 min and < 4 GiB on dev-2c. Prints a table, writes JSON.

    python -m bench.prototypes_speed [--images 100000] [--channels 512] [--strategies 5] [--threads 2]
    python -m bench.prototypes_speed --variance 1.0 --out bench/results/prototypes_speed_32dims.json   # worst case
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import write_results

DEFAULT_OUT = Path("bench/results/prototypes_speed.json")
TARGET_S, TARGET_GIB = 300, 4.0


def synthetic_vectors(n: int, channels: int, strategies: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) float32 vectors and their (N,) strategy, drawn from a Gaussian mixture in the space of normalised
    concept relevance: each strategy a sparse profile of shares (24 concepts carry most of the relevance, the row sums
    to 1), images that profile plus correlated noise (8 factors of the strategy) and a little independent noise, so
    that the vectors' |R| sums stay near 1 as CRP's normalisation makes them. Generated in blocks (the peak stays
    near the result's size)."""
    rng = np.random.default_rng(seed)
    profiles = np.zeros((strategies, channels))
    for j in range(strategies):
        active = rng.choice(channels, 24, replace=False)
        profiles[j, active] = rng.gamma(2.0, 1.0, 24)
    profiles /= profiles.sum(axis=1, keepdims=True)
    factors = rng.normal(0, 0.0005, (strategies, 8, channels))
    weights = rng.dirichlet(np.full(strategies, 4.0))
    labels = rng.choice(strategies, n, p=weights)
    out = np.empty((n, channels), np.float32)
    for start in range(0, n, 10_000):
        part = labels[start:start + 10_000]
        x = profiles[part] + np.einsum("nf,nfc->nc", rng.normal(0, 1, (len(part), 8)), factors[part])
        out[start:start + len(part)] = x + rng.normal(0, 0.0003, x.shape)
    return out, labels


def _child(args: argparse.Namespace) -> None:
    """Generate, fit, print the figures as JSON (run in a fresh process)."""
    from pipeline.audit.prototype_mixture import MixtureParams
    from pipeline.audit.prototypes import PrototypeOptions, analyse_class

    started = time.perf_counter()
    vectors, labels = synthetic_vectors(args.images, args.channels, args.strategies)
    generated = time.perf_counter() - started
    reset = _reset_peak()  # the generator's temporaries are not the fit's
    before = _rss_mib()
    options = PrototypeOptions(params=MixtureParams(max_components=args.max_components, dims=args.dims,
                                                    variance=args.variance))
    begun = time.perf_counter()
    result = analyse_class(0, vectors, options, args.threads)
    seconds = time.perf_counter() - begun
    from sklearn.metrics import adjusted_rand_score

    print(json.dumps({"seconds": seconds, "generate_s": generated, "phases": result.mixture.seconds,
                      "components": result.mixture.components, "bic": result.mixture.bic,
                      "dims": result.mixture.dims, "ari": adjusted_rand_score(labels, result.mixture.prototype),
                      "vectors_mib": vectors.nbytes / 2 ** 20, "rss_before_fit_mib": before,
                      "peak_rss_mib": _peak_mib(), "peak_reset_before_fit": reset}))


def _reset_peak() -> bool:
    """Linux: VmHWM back to the current resident size (clear_refs 5), so the peak measured is the fit's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "pipeline/audit", "bench"], capture_output=True, text=True)
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--strategies", type=int, default=5, help="components of the generating mixture")
    parser.add_argument("--max-components", type=int, default=8)
    parser.add_argument("--dims", type=int, default=32)
    parser.add_argument("--variance", type=float, default=0.7,
                        help="1.0 keeps --dims principal components whatever they explain: the costliest fit")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    command = [sys.executable, "-m", "bench.prototypes_speed", "--child", "--images", str(args.images), "--channels",
               str(args.channels), "--strategies", str(args.strategies), "--max-components",
               str(args.max_components), "--dims", str(args.dims), "--variance", str(args.variance), "--threads",
               str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    load = os.getloadavg()[0]
    rows = [("images x channels", f"{args.images:,} x {args.channels}"),
            ("vectors (float32)", f"{figures['vectors_mib']:.0f} MiB"),
            (f"fit (PCA, BIC over 1..{args.max_components}, scores, deviations)", f"{figures['seconds']:.1f} s"),
            *((f"  {phase}", f"{value:.1f} s") for phase, value in figures["phases"].items()),
            ("resident before the fit (Python, libraries, vectors)", f"{figures['rss_before_fit_mib']:.0f} MiB"),
            ("peak RSS during the fit" + ("" if figures["peak_reset_before_fit"] else " (not reset: since start)"),
             f"{figures['peak_rss_mib']:.0f} MiB"),
            ("principal components kept", f"{figures['dims']} (--variance {args.variance}, --dims {args.dims})"),
            ("components chosen / generated", f"{figures['components']} / {args.strategies}"),
            ("ARI prototypes vs strategies", f"{figures['ari']:.3f}"),
            ("target", f"< {TARGET_S} s and < {TARGET_GIB} GiB: "
                       + ("met" if figures["seconds"] < TARGET_S and figures["peak_rss_mib"] < TARGET_GIB * 1024
                          else "NOT met")),
            ("1-minute load", f"{load:.1f}")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    write_results(args.out, {"benchmark": "prototypes_speed", "date": time.strftime("%Y-%m-%d"), "commit": _commit(),
                             "machine": platform.node(), "cpus": os.cpu_count(), "load_1min": load,
                             "settings": vars(args) | {"out": str(args.out)}, **figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
