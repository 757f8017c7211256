"""`python -m pipeline correct RUN`: the subcommand's arguments and its one-line errors (exit 2), kept here so that
pipeline/cli.py only registers it."""
from __future__ import annotations

import argparse
import sys

from ..errors import PipelineError, lower_layer_errors
from .correct import GATES, CorrectionOptions, correct

DESCRIPTION = ("R-ClArC / P-ClArC: project an artifact's direction (the pattern CAV of the marked images against the "
               "clean ones at LAYER) out of the layer's activations, towards the clean images' mean, in the images "
               "where the artifact is detected (or in all: --gate always); writes the corrected "
               "model to OUT (weights, verified LRP artifacts, classifier, correction.json). Re-audit it with the "
               "`make explain` line it prints.")


def add_correct_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("correct", help="R-/P-ClArC correction of the run's model -> OUT (artifacts/...)",
                            description=DESCRIPTION)
    p.add_argument("run", help="run directory (the OUT of `explain`)")
    p.add_argument("--layer", required=True, help="a concept layer name: features.28, layer4.2, layer4, ...")
    p.add_argument("--marked", required=True, help="CSV with an image_id column: the images with the artifact "
                   "(with a 0/1 `marked` or `tag` column: its rows with 1)")
    p.add_argument("--clean", help="CSV of clean image ids (default: the run's other images)")
    p.add_argument("--out", help="output folder, new or empty (default artifacts/<run>-pclarc-<layer>)")
    p.add_argument("--composite", help="LRP composite of the corrected artifacts (default: the run's)")
    p.add_argument("--max-images", type=int, default=CorrectionOptions.max_images,
                   help=f"at most this many marked and clean images each (a seeded sample; default "
                        f"{CorrectionOptions.max_images})")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed")
    p.add_argument("--gate", choices=GATES, default=CorrectionOptions.gate,
                   help="detected (R-ClArC, default): project only the images whose artifact score exceeds the "
                        "threshold fitted on the marked and clean images; always (P-ClArC): every image")


def run_correct_command(args: argparse.Namespace) -> int:
    options = CorrectionOptions(layer=args.layer, marked=args.marked, clean=args.clean, out=args.out,
                                composite=args.composite, max_images=args.max_images, seed=args.seed,
                                gate=args.gate)
    try:
        with lower_layer_errors():
            record = correct(args.run, options)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    clean, marked = record["before_after"]["clean"], record["before_after"]["marked"]
    print(f"{record['images']['marked']} marked, {record['images']['clean']} clean images; projection after "
          f"{record['after_module']} ({record['inserted']}) -> {record['out']}")
    print(f"  clean accuracy {clean['accuracy_before']} -> {clean['accuracy_after']}, marked accuracy "
          f"{marked['accuracy_before']} -> {marked['accuracy_after']}; verified: "
          + ", ".join(f"{k} {'ok' if v['ok'] else 'FAILED'}" for k, v in record["export"]["verification"].items()))
    gate = record["gate"]
    if gate["threshold"] is not None:
        print(f"  gate: projects {gate['marked_projected']:.0%} of the marked and {gate['clean_projected']:.0%} of "
              f"the clean images used (artifact score > {gate['threshold']:.4g})")
    print(f"  re-audit: {record['explain']}")
    return 0
