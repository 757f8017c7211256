"""`python -m pipeline report RUN`, `python -m pipeline heatmaps RUN --ids a,b` and `python -m pipeline concepts RUN
--layer L`: the subcommands' arguments and their one-line errors (exit 2), kept here so that pipeline/cli.py only
registers them."""
from __future__ import annotations

import argparse
import sys

import torch

from ..concepts.references import DEFAULT_CHANNELS, DEFAULT_REFERENCES, ConceptsError
from ..errors import PipelineError, lower_layer_errors
from .build import build_report, write_heatmaps
from .concept_pictures import write_references
from .heatmap import COLOUR_MAPS, DEFAULT_COLOUR_MAP

REPORT_COMMANDS = ("report", "heatmaps", "concepts")


def add_report_commands(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser("report", help="write RUN/report/index.html: summary, galleries, plots, tables",
                                 description="Write a self-contained HTML report of a run (index.html + img/).")
    report.add_argument("run", help="run directory (the OUT of `explain`)")
    report.add_argument("--out", help="report folder (default RUN/report)")
    report.add_argument("--per-class", type=int, default=1, help="images shown per class (default 1)")
    report.add_argument("--gallery", type=int, default=12, help="images per gallery (default 12)")
    report.add_argument("--cmap", choices=sorted(COLOUR_MAPS), default=DEFAULT_COLOUR_MAP, help="colour map")
    heatmaps = commands.add_parser("heatmaps", help="write PNG heat maps (and overlays) of chosen images",
                                   description="Write <id>-heatmap.png, -image.png and -overlay.png per image.")
    heatmaps.add_argument("run", help="run directory (the OUT of `explain`)")
    heatmaps.add_argument("--ids", required=True, help="comma-separated image ids")
    heatmaps.add_argument("--out", help="folder (default RUN/heatmaps)")
    heatmaps.add_argument("--cmap", choices=sorted(COLOUR_MAPS), default=DEFAULT_COLOUR_MAP, help="colour map")
    _add_concepts_command(commands)


def _add_concepts_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("concepts", help="reference images of a layer's concepts (CRP) -> RUN/concept-references/",
                            description="Each concept's most relevant images (the run's RelMax table), cropped to "
                                        "its most relevant neuron's receptive field, with its conditional heat map "
                                        "(a full backward pass from the image's class): PNGs per image and a grid "
                                        "per channel.")
    p.add_argument("run", help="run directory (the OUT of `explain`, made with concepts on)")
    p.add_argument("--layer", required=True, help="a layer the run has concept data for, e.g. features.28")
    p.add_argument("--channels", default="", help=f"comma-separated channels (default: the {DEFAULT_CHANNELS} "
                                                  "with the largest mean relevance)")
    p.add_argument("--class", dest="klass", type=int, default=None,
                   help="references among the images explained for this class (default: all images)")
    p.add_argument("--references", type=int, default=DEFAULT_REFERENCES,
                   help=f"images per channel (default {DEFAULT_REFERENCES})")
    p.add_argument("--float64", action="store_true", help="compute the maps in float64 (default float32)")
    p.add_argument("--out", help="folder (default RUN/concept-references)")
    p.add_argument("--cmap", choices=sorted(COLOUR_MAPS), default=DEFAULT_COLOUR_MAP, help="colour map")


def channel_list(text: str) -> list[int] | None:
    """`1,2,3` -> [1, 2, 3]; empty -> None (the most relevant ones)."""
    parts = [part.strip() for part in (text or "").split(",") if part.strip()]
    try:
        return [int(part) for part in parts] or None
    except ValueError:
        raise ConceptsError(f"--channels must be comma-separated channel numbers, got {text!r}") from None


def _concepts(args: argparse.Namespace) -> None:
    written = write_references(args.run, args.layer, channel_list(args.channels), args.klass, args.references,
                               args.out, args.cmap, torch.float64 if args.float64 else torch.float32)
    print(f"{len(written)} files -> {written[0].parent}" if written else "no reference image could be read")


def run_report_command(args: argparse.Namespace) -> int:
    try:
        with lower_layer_errors():
            if args.command == "report":
                build_report(args.run, args.out, per_class=args.per_class, gallery=args.gallery, cmap=args.cmap)
            elif args.command == "concepts":
                _concepts(args)
            else:
                written = write_heatmaps(args.run, args.ids.split(","), args.out, cmap=args.cmap)
                print(f"{len(written)} files -> {written[0].parent}")
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
