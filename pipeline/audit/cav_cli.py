"""`python -m pipeline cav RUN --layer L --marked ids.csv | --prototype CLASS:K`: the subcommand's arguments and
its one-line errors (exit 2), kept here so that pipeline/cli.py only registers it."""
from __future__ import annotations

import argparse
import sys

from ..errors import PipelineError, lower_layer_errors
from .cav_run import CavOptions, cav_audit

DESCRIPTION = ("An artifact concept over a finished run explained with concepts: the pattern and the classifier CAV "
               "of the marked images at a concept layer (fitted on the run's concept-relevance vectors), every image "
               "ranked by them, each channel's AUROC for the marked set, retrieval AUROC / AP against a truth, R_bias "
               "inside masks; writes RUN/cav/NAME-images.parquet, -channels.parquet, -vectors.parquet and NAME.json "
               "(docs/audit.md).")


def add_cav_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("cav", help="CAVs of marked images, the run ranked by them, R_bias -> RUN/cav/",
                            description=DESCRIPTION)
    defaults = CavOptions(layer="")
    p.add_argument("run", help="run directory (the OUT of `explain`, with CONCEPTS=<layer>)")
    p.add_argument("--layer", required=True, help="a concept layer of the run (e.g. features.28)")
    marked = p.add_mutually_exclusive_group(required=True)
    marked.add_argument("--marked", help="CSV with an image_id column: the images marked as carrying the artifact")
    marked.add_argument("--prototype", help="CLASS:K: the images of prototype K of class CLASS "
                        "(RUN/prototypes/images.parquet: make prototypes)")
    p.add_argument("--truth", help="CSV of image_id and a 0/1 column (`truth`, or its only other column): retrieval "
                   "AUROC and average precision")
    p.add_argument("--masks", help=".npz as the dataset's masks.npz: `mask` (M, H, W) in the images' own pixels with "
                   "`image_id` (M,), or one (H, W) `mask` for every image: R_bias")
    p.add_argument("--name", default=defaults.name, help=f"the artifact concept's name, in the file names (default "
                   f"{defaults.name})")
    p.add_argument("--channel", type=int, help="channel whose conditional maps get R_bias (default: the best by "
                   "auroc_marked; needs the run's maps layer)")
    p.add_argument("--raw", action="store_true", help="fit on the concept relevance as stored (default: each "
                   "image's vector over its sum of |R|, CRP's shares)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="the classifier's seed (default 0)")


def run_cav_command(args: argparse.Namespace) -> int:
    try:
        options = CavOptions(layer=args.layer, marked=args.marked, prototype=args.prototype, truth=args.truth,
                             masks=args.masks, name=args.name, channel=args.channel, normalised=not args.raw,
                             seed=args.seed)
        with lower_layer_errors():
            summary = cav_audit(args.run, options)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in summary_lines(summary):
        print(line)
    return 0


def summary_lines(summary: dict) -> list[str]:
    """What the terminal shows: counts, the best channels, retrieval and R_bias figures, where the files are."""
    lines = [f"{summary['images']} images ranked at {summary['layer']} ({summary['marked']['images']} marked) in "
             f"{summary['seconds']['total']:.1f} s -> {summary['run']}/cav/{summary['name']}-*.parquet"]
    lines.append("  best channels (AUROC for the marked set" + (", for the truth" if summary["truth"] else "")
                 + "): " + ", ".join(f"{c['channel']} {c['auroc_marked']:.3f}"
                                     + (f"/{c['auroc_truth']:.3f}" if c["auroc_truth"] is not None else "")
                                     for c in summary["best_channels"]))
    if summary["truth"]:
        for name, entry in summary["truth"]["retrieval"].items():
            every, held = entry["all"], entry["unmarked"]
            lines.append(f"  {name}: AUROC {_figure(every['auroc'])}, AP {_figure(every['average_precision'])} "
                         f"(unmarked images: AUROC {_figure(held['auroc'])}, AP {_figure(held['average_precision'])})")
    if summary["masks"]:
        masks = summary["masks"]
        for key, label in (("r_bias_mean", "R_bias of the map"),
                           ("r_bias_concept_mean", f"R_bias of channel {masks['concept_channel']}'s maps")):
            means = masks[key]
            lines.append(f"  {label}: marked {_figure(means['marked'])}, clean {_figure(means['clean'])}"
                         + (f", truth {_figure(means['truth'])}" if summary["truth"] else ""))
    return lines


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
