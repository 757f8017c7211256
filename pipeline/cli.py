"""`python -m pipeline explain`: explain a dataset with LRP into HDF5 maps and Parquet statistics."""
from __future__ import annotations

import argparse
import sys
import traceback

from .audit.cav_cli import add_cav_command, run_cav_command
from .audit.correct_cli import add_correct_command, run_correct_command
from .audit.prototype_cli import add_prototypes_command, run_prototypes_command
from .config import load_config
from .errors import PipelineError, StrictStop, lower_layer_errors
from .layout import RunLayout
from .report.cli import REPORT_COMMANDS, add_report_commands, run_report_command
from .run import explain
from .run_lock import hold_run
from .run_manifest import Manifest
from .sanity.cli import add_sanity_command, run_sanity_command
from .spray.cli import add_spray_command, run_spray_command

EXIT_CODES = ("exit codes: 0 every image explained; 1 some images could not be explained (listed in "
              "failures.parquet; with --strict, the first one stops the run); 2 the run could not start or "
              "finish (configuration, dataset, weights, unwritable or full output directory)")

OPTIONS = [
    ("dataset", str, "a name in configs/datasets/ (sample, imagenet-val) or a folder / tar-shard glob"),
    ("layout", str, "imagefolder | imagenet_val | webdataset | plain (default: detected)"),
    ("labels", str, "label file: Kaggle's LOC_val_solution.csv or the devkit's ground truth .txt (default: searched)"),
    ("synsets", str, "class list: the devkit's meta.mat or LOC_synset_mapping.txt (default: searched)"),
    ("boxes", str, "folder of PASCAL VOC box XMLs (default: searched)"),
    ("limit", int, "explain only the first N images"),
    ("model", str, "vgg11, ..., vgg19_bn, resnet18, ..., resnet152, wide_resnet50_2, wide_resnet101_2, "
                   "resnext50_32x4d, vgg-shapes, vgg-shapes-hans (the demo models)"),
    ("weights", str, "auto | imagenet | demo | random | path to a state-dict file"),
    ("composite", str, "epsilon_gamma_box, epsilon_plus, epsilon_plus_flat, epsilon_alpha2_beta1, ..."),
    ("top_k", float, "relevance filter: fraction kept per layer (0 = off)"),
    ("target", str, "predicted | label (unlabelled images are failure rows) | a class index"),
    ("classes", str, "the model's class names: a file, one name per line, or index<TAB>wnid<TAB>name lines as "
                     "configs/imagenet_classes.tsv (default: the model's own; none for a state dict whose head "
                     "is not ImageNet's)"),
    ("size", int, "centre-crop size (default: configs/run.yaml's, the weights' 224)"),
    ("batch_size", int, "images per forward pass"),
    ("shard_size", int, "images per shard"),
    ("map_dtype", str, "float16 | float32"),
    ("compression", int, "gzip level 0-9 of the maps"),
    ("actors", str, "auto (one per GPU, else one CPU actor) or a number"),
    ("decode_threads", int, "decoding threads per actor"),
    ("max_image_bytes", int, "an image file or tar member bigger than this is a failure row, never read "
                             "(default 268435456: 256 MiB)"),
    ("device", str, "auto | cpu | cuda"),
    ("precision", str, "fp32 | tf32 (CUDA: TF32 matmuls and convolutions; no effect on a CPU)"),
    ("shard_timeout_s", float,
     "seconds before a silent actor is killed and its shard retried (default 120 + 10/image)"),
    ("shard_retries", int, "retries of a shard whose actor crashed or hung, before its images are isolated"),
    ("out", str, "run directory (default runs/<dataset>-<model>-<composite>)"),
    ("cache", str, "where traced LRP modules are kept"),
    ("flip_steps", int, "pixel flipping: regions perturbed (with --faithfulness)"),
    ("flip_patch", int, "pixel flipping: region side in pixels (with --faithfulness)"),
    ("concepts", str, "concepts (CRP) at these layers: comma-separated module names, e.g. features.28 (the rest "
                      "from configs/run.yaml's concepts: block)"),
    ("metrics", str, "evaluation metrics: comma-separated names or groups (localisation, complexity, faithfulness, "
                     "randomisation, all; docs/metrics.md)"),
    ("pointing_tolerance", float, "pointing game: pixels around the boxes that count as a hit (TorchRay: 15)"),
]


class OneLineParser(argparse.ArgumentParser):
    """A bad option is one line naming it (exit 2), not the whole usage; --help still shows everything."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


INTERRUPTED = ("interrupted: finished shards are kept; run the same command again to resume (only unfinished "
               "shards are redone)")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m pipeline")
    commands = p.add_subparsers(dest="command", required=True)
    run = commands.add_parser("explain", help=__doc__.splitlines()[0],
                              description=__doc__.splitlines()[0] + " Values override configs/run.yaml.",
                              epilog=EXIT_CODES)
    for name, kind, doc in OPTIONS:
        run.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=doc)
    run.add_argument("--faithfulness", action="store_true", default=None,
                     help="pixel flipping per image: MoRF and random-order curves and their AOPC")
    run.add_argument("--overwrite", action="store_true", help="replace a run directory made with another config")
    run.add_argument("--strict", action="store_true", help="stop at the first image that cannot be explained "
                     "(exit code 1, no _SUCCESS)")
    run.add_argument("--no-space-check", action="store_true",
                     help="skip the free-space estimate made before the run (write errors still stop it)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_report_commands(commands)
    add_spray_command(commands)
    add_sanity_command(commands)
    add_cav_command(commands)
    add_correct_command(commands)
    add_prototypes_command(commands)
    return p


def _run_reader(args: argparse.Namespace) -> int:
    """report, heatmaps, spray, sanity, prototypes, cav and correct under the run's lock (pipeline/run_lock.py): none
    reads a run that an explain is writing, nor writes beside another one's outputs."""
    try:
        with hold_run(args.run, args.command, create=False):
            if args.command == "sanity":
                return run_sanity_command(args)
            if args.command == "cav":
                return run_cav_command(args)
            if args.command == "correct":
                return run_correct_command(args)
            if args.command == "prototypes":
                return run_prototypes_command(args)
            return run_report_command(args) if args.command in REPORT_COMMANDS else run_spray_command(args)
    except PipelineError as error:  # the lock (the commands print their own errors)
        print(f"error: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in (*REPORT_COMMANDS, "spray", "sanity", "prototypes", "cav", "correct"):
        return _run_reader(args)
    overrides = {name: getattr(args, name) for name, _, _ in OPTIONS}
    overrides["faithfulness"] = args.faithfulness
    try:
        with lower_layer_errors():
            config = load_config(overrides)
            record = explain(config, overwrite=args.overwrite, strict=args.strict, progress=not args.no_progress,
                             check_space=not args.no_space_check)
            manifest = Manifest.from_record(record, RunLayout(config.out).manifest)
    except KeyboardInterrupt:  # Ctrl-C: every finished file is complete (atomic renames), the run resumes
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except StrictStop as error:  # an image failed, as without --strict: exit code 1
        print(f"error: {error}", file=sys.stderr)
        return 1
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception:  # a bug: the traceback, and the code of a run that could not finish (never 1)
        traceback.print_exc()
        return 2
    totals = manifest.totals
    reasons = ", ".join(f"{k} {v}" for k, v in manifest.failure_reasons.items())
    print(f"{totals.explained} explained, {totals.failed} failed{': ' + reasons if reasons else ''} -> {config.out}")
    if manifest.random_weights:
        print("WARNING: RANDOM weights (no ImageNet weights were available); see manifest.json", file=sys.stderr)
    return 1 if totals.failed else 0
