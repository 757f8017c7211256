"""`python -m pipeline prototypes RUN`: the subcommand's arguments and its one-line errors (exit 2), kept here so
that pipeline/cli.py only registers it."""
from __future__ import annotations

import argparse
import sys

from ..classes import class_indices
from ..errors import PipelineError, lower_layer_errors
from .prototype_mixture import MixtureParams
from .prototypes import PrototypeOptions, PrototypesError, prototypes

DESCRIPTION = ("Prototypes of a run explained with concepts (PCX): per class, a Gaussian mixture over the images' "
               "concept-relevance vectors at one layer, its number of components chosen by BIC; per image its "
               "prototype, log-likelihood, outlier rank and deviating concepts; writes RUN/prototypes/ "
               "(images.parquet, prototypes.parquet, summary.json).")


def add_prototypes_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("prototypes", help="each class's concept prototypes (PCX) -> RUN/prototypes/",
                            description=DESCRIPTION)
    defaults, params = PrototypeOptions(), MixtureParams()
    p.add_argument("run", help="run directory (the OUT of `explain`, made with concepts on)")
    p.add_argument("--layer", help="a layer the run has concept data for (default: its maps layer)")
    p.add_argument("--classes", help="comma-separated class indices (default: every class with enough images)")
    p.add_argument("--max-components", type=int, default=params.max_components,
                   help=f"most prototypes per class; BIC chooses up to it (default {params.max_components})")
    p.add_argument("--seed", type=int, default=params.seed, help=f"the mixtures' seed (default {params.seed})")
    p.add_argument("--variance", type=float, default=params.variance,
                   help=f"the mixtures live in the fewest principal components explaining this share of the class's "
                        f"variance (default {params.variance})")
    p.add_argument("--dims", type=int, default=params.dims,
                   help=f"and in at most this many (default {params.dims}; also at most one per "
                        f"{params.images_per_dim} images of the class)")
    p.add_argument("--closest", type=int, default=defaults.closest,
                   help=f"closest images listed per prototype (default {defaults.closest})")
    p.add_argument("--deviations", type=int, default=defaults.deviations,
                   help=f"over- and under-used concepts listed per image (default {defaults.deviations})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_prototypes_command(args: argparse.Namespace) -> int:
    try:
        params = MixtureParams(max_components=args.max_components, seed=args.seed, dims=args.dims,
                               variance=args.variance)
        options = PrototypeOptions(layer=args.layer, classes=class_indices(args.classes, PrototypesError),
                                   params=params, closest=args.closest, deviations=args.deviations)
        with lower_layer_errors():
            summary = prototypes(args.run, options, progress=not args.no_progress)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    skipped = summary["skipped"]
    print(f"{summary['images']} images in {len(summary['classes'])} classes at {summary['layer']}"
          + (f", {len(skipped)} skipped ({', '.join(str(s['class']) for s in skipped[:10])})" if skipped else "")
          + f" in {summary['seconds']:.1f} s -> {summary['out']}")
    for entry in summary["classes"][:10]:
        weights = "/".join(f"{w:.2f}" for w in entry["weights"])
        print(f"  {entry['name']} ({entry['class']}): {entry['images']} images, {entry['components']} prototypes "
              f"(weights {weights})")
    if not summary["complete"]:
        print(f"warning: unfinished run (no manifest.json or _SUCCESS in {summary['run']}): only the images of the "
              "shards finished so far were analysed", file=sys.stderr)
    return 0
