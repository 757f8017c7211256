"""`python -m pipeline spray RUN`: the subcommand's arguments and its one-line errors (exit 2), kept here so that
pipeline/cli.py only registers it."""
from __future__ import annotations

import argparse
import sys

from ..classes import class_indices
from ..errors import PipelineError, lower_layer_errors
from .analyse import SprayParams
from .features import VARIANTS
from .inputs import BY, SprayRunError
from .run import SprayOptions, spray

DESCRIPTION = ("Spectral relevance analysis (SpRAy) of a run: per class, cluster the relevance maps into the "
               "strategies the model uses; writes RUN/spray/ (clusters.parquet, summary.json, a ViRelAy project).")


def add_spray_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("spray", help="cluster each class's maps into strategies (SpRAy) -> RUN/spray/",
                            description=DESCRIPTION)
    defaults, params = SprayOptions(), SprayParams()
    p.add_argument("run", help="run directory (the OUT of `explain`)")
    p.add_argument("--by", choices=BY, default=defaults.by, help="group images by predicted class (default) or label")
    p.add_argument("--variant", choices=VARIANTS, default=defaults.variant,
                   help="map normalisation: absspectral (|R| over its sum, default) or spectral (R over its sum)")
    p.add_argument("--grid", type=int, default=defaults.grid, help="sum-pooling grid side (default 32)")
    p.add_argument("--min-images", type=int, default=defaults.min_images,
                   help=f"classes with fewer images are skipped and listed (default {defaults.min_images})")
    p.add_argument("--classes", help="comma-separated class indices to analyse (default: all)")
    p.add_argument("--neighbours", type=int, default=params.neighbours, help="k of the kNN graph (default 10)")
    p.add_argument("--eigenvalues", type=int, default=params.eigenvalues, help="eigenpairs computed (default 32)")
    p.add_argument("--k-max", type=int, default=params.k_max, help="largest number of clusters (default 8)")
    p.add_argument("--seed", type=int, default=params.seed, help="k-means / t-SNE seed (default 0)")
    p.add_argument("--large-class", type=int, default=params.large_class,
                   help=f"classes with more images: neighbours among 64 principal components, Ward of a sample "
                        f"(default {params.large_class})")
    p.add_argument("--no-embedding", action="store_true", help="skip t-SNE: x, y are the 2nd and 3rd eigenvectors")
    p.add_argument("--no-virelay", action="store_true", help="do not write the ViRelAy project")
    p.add_argument("--no-virelay-images", action="store_true",
                   help="ViRelAy project with black images (no copy of the crops: N x size^2 x 3 bytes saved)")
    p.add_argument("--out", help="output folder (default RUN/spray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_spray_command(args: argparse.Namespace) -> int:
    try:
        params = SprayParams(neighbours=args.neighbours, eigenvalues=args.eigenvalues, k_max=args.k_max,
                             seed=args.seed, embedding=not args.no_embedding, large_class=args.large_class)
        options = SprayOptions(by=args.by, variant=args.variant, grid=args.grid, min_images=args.min_images,
                               params=params, classes=class_indices(args.classes, SprayRunError),
                               virelay=not args.no_virelay,
                               virelay_images=not args.no_virelay_images, out=args.out)
        with lower_layer_errors():
            summary = spray(args.run, options, progress=not args.no_progress)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    classes = summary["classes"]
    skipped = summary["skipped"]
    print(f"{summary['images']} images in {len(classes)} classes analysed"
          + (f", {len(skipped)} skipped ({', '.join(str(s['class']) for s in skipped[:10])})" if skipped else "")
          + f" in {summary['seconds']:.1f} s -> {summary['out']}")
    for entry in classes[:5]:
        flag = "  <- Clever-Hans candidate" if entry["candidate"] else ""
        sizes = "/".join(str(c["images"]) for c in entry["clusters"])
        print(f"  {entry['rank']}. {entry['name']} ({entry['class']}): eigengap {entry['eigengap']:.3f}, "
              f"k = {entry['k_chosen']} (clusters {sizes}){flag}")
    for line in notices(summary):
        print(line, file=sys.stderr)
    return 0


def notices(summary: dict) -> list[str]:
    """Warnings under the result: an unfinished run, classes whose clusterings for some k say nothing."""
    lines = [] if summary.get("complete", True) else [
        f"warning: unfinished run (no manifest.json or _SUCCESS in {summary['run']}): only the images of the shards "
        "finished so far were analysed; run the same explain command again to finish it, then spray again"]
    small = [e for e in summary["classes"] if e.get("k_not_meaningful")]
    if small:
        listed = ", ".join(f"{e['class']} (k = {','.join(e['k_not_meaningful'])})" for e in small[:10])
        lines.append(f"note: {len(small)} class(es) too small or too uniform for some k, whose clusterings say "
                     f"nothing: {listed}{' ...' if len(small) > 10 else ''} (summary.json: k_not_meaningful)")
    return lines
