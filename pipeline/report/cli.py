"""`python -m pipeline report RUN` and `python -m pipeline heatmaps RUN --ids a,b`: the subcommands' arguments
and their one-line errors (exit 2), kept here so that pipeline/cli.py only registers them."""
from __future__ import annotations

import argparse
import sys

from ..errors import PipelineError, lower_layer_errors
from .build import build_report, write_heatmaps
from .heatmap import COLOUR_MAPS, DEFAULT_COLOUR_MAP

REPORT_COMMANDS = ("report", "heatmaps")


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


def run_report_command(args: argparse.Namespace) -> int:
    try:
        with lower_layer_errors():
            if args.command == "report":
                build_report(args.run, args.out, per_class=args.per_class, gallery=args.gallery, cmap=args.cmap)
            else:
                written = write_heatmaps(args.run, args.ids.split(","), args.out, cmap=args.cmap)
                print(f"{len(written)} files -> {written[0].parent}")
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
