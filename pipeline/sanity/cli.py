"""`python -m pipeline sanity RUN`: the subcommand's arguments and its one-line errors (exit 2), kept here so that
pipeline/cli.py only registers it."""
from __future__ import annotations

import argparse
import sys

from ..errors import PipelineError, lower_layer_errors
from .measures import SSIM_MODES
from .mprt import SanityParams
from .randomise import MODES
from .run import DEVICES, SanityOptions, sanity

DESCRIPTION = ("Model parameter randomisation test (MPRT, Adebayo et al. 2018) and eMPRT over a sample of a "
               "finished run's images: the maps of the model with its layers randomised from the top down "
               "(cascading) and one at a time (independent), compared with the original maps; writes "
               "RUN/sanity.parquet, which the report draws as a cascade plot.")


def add_sanity_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("sanity", help="model parameter randomisation test (MPRT, eMPRT) -> RUN/sanity.parquet",
                            description=DESCRIPTION)
    params = SanityParams()
    p.add_argument("run", help="run directory (the OUT of `explain`)")
    p.add_argument("--images", "-n", type=int, required=True, help="images sampled from the run (1 to the run's)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--seed", type=int, default=params.seed,
                   help=f"randomisation seed: each layer reset after torch.manual_seed(seed + 1), as Quantus "
                        f"(default {params.seed})")
    p.add_argument("--modes", default=",".join(params.modes),
                   help=f"comma-separated: {', '.join(MODES)} (default both)")
    p.add_argument("--ssim", default=params.ssim, help=f"{' | '.join(SSIM_MODES)}: SSIM of the 2-D map (Adebayo et "
                   "al., default) or of the flattened map (Quantus's MPRT)")
    p.add_argument("--intersection-k", type=int, default=params.intersection_k,
                   help=f"top-k intersection's k in pixels (default {params.intersection_k}, Quantus's)")
    p.add_argument("--entropy-bins", type=int, default=params.entropy_bins,
                   help=f"eMPRT's histogram bins (default {params.entropy_bins}, Quantus's)")
    p.add_argument("--batch-size", type=int, default=params.batch_size, help="images per LRP pass")
    p.add_argument("--device", default="auto", help=f"{' | '.join(DEVICES)} (auto: CUDA when available)")
    p.add_argument("--out", help="output file (default RUN/sanity.parquet)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_sanity_command(args: argparse.Namespace) -> int:
    try:
        params = SanityParams(modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()), seed=args.seed,
                              ssim=args.ssim, intersection_k=args.intersection_k, entropy_bins=args.entropy_bins,
                              batch_size=args.batch_size)
        options = SanityOptions(images=args.images, sample_seed=args.sample_seed, params=params, device=args.device,
                                out=args.out)
        with lower_layer_errors():
            result = sanity(args.run, options, progress=not args.no_progress)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{result['images']} images, {result['layers']} layers randomised, {result['passes']} LRP passes on "
          f"{result['device']} in {result['seconds']:.1f} s -> {result['out']}")
    table = result["summary"]
    for mode in table["mode"].unique():
        rows = table[table["mode"] == mode]
        print(f"  {mode}: mean Spearman |R| " + " ".join(f"{v:.2f}" for v in rows["spearman_abs"])
              + f" (step 0 .. {rows['step'].max()}; last layer randomised: {rows['layer'].iloc[-1]})")
    return 0
