"""`python -m pipeline concepts RUN --layer L [--channels 1,2,3]`: the subcommand's arguments and its one-line
errors (exit 2), kept here so that pipeline/cli.py only registers it."""
from __future__ import annotations

import argparse
import sys

import torch

from ..errors import PipelineError, lower_layer_errors
from ..report.heatmap import COLOUR_MAPS, DEFAULT_COLOUR_MAP
from .references import DEFAULT_CHANNELS, DEFAULT_REFERENCES, ConceptsError, write_references


def add_concepts_command(commands: argparse._SubParsersAction) -> None:
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


def channels(text: str) -> list[int] | None:
    """`1,2,3` -> [1, 2, 3]; empty -> None (the most relevant ones)."""
    parts = [part.strip() for part in (text or "").split(",") if part.strip()]
    try:
        return [int(part) for part in parts] or None
    except ValueError:
        raise ConceptsError(f"--channels must be comma-separated channel numbers, got {text!r}") from None


def run_concepts_command(args: argparse.Namespace) -> int:
    try:
        with lower_layer_errors():
            written = write_references(args.run, args.layer, channels(args.channels), args.klass, args.references,
                                       args.out, args.cmap, torch.float64 if args.float64 else torch.float32)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(written)} files -> {written[0].parent}" if written else "no reference image could be read")
    return 0
