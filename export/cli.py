"""`python -m export`: write (and verify) the LRP artifacts for one model + weights + composite + top-k."""
from __future__ import annotations

import argparse
import json
import sys

from lrp_module.composites import COMPOSITES
from lrp_module.zoo import MODEL_NAMES, WeightsError

from .artifacts import FILENAMES, ExportConfig, ExportError, VerificationError, export_artifacts
from .concepts import ConceptRequest
from .runner import ArtifactError

EXIT_CODES = ("exit codes (as `python -m pipeline explain`): 0 written and verified; 1 written, but an artifact "
              "failed its check against eager LRP; 2 nothing could be exported (configuration, weights, OUT)")


class OneLineParser(argparse.ArgumentParser):
    """A bad option is one line naming it (exit 2), not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m export", description=__doc__.splitlines()[0], epilog=EXIT_CODES)
    p.add_argument("--model", default="vgg16", help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (torch hub cache or download), 'demo' (vgg-shapes' committed weights), "
                   "a state-dict "
                        "file, or 'random'")
    p.add_argument("--composite", default="epsilon_gamma_box", help=f"one of {', '.join(COMPOSITES)}")
    p.add_argument("--top-k", type=float, default=0.0, help="fraction of relevance kept per layer (0 = off)")
    p.add_argument("--rescale-top-k", action="store_true", help="conserve each image's total after filtering")
    p.add_argument("--size", type=int, nargs=2, default=(ExportConfig.height, ExportConfig.width), metavar=("H", "W"),
                   help="input size")
    p.add_argument("--per-channel", action="store_true", help="relevance (N, C, H, W) instead of (N, H, W)")
    p.add_argument("--formats", default=",".join(FILENAMES),
                   help=f"comma-separated subset of {', '.join(FILENAMES)}")
    p.add_argument("--num-classes", type=int, default=None, help="classes of a random or file model")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-verify", action="store_true", help="skip the fresh-process check against eager LRP")
    p.add_argument("--concepts", default=None, metavar="LAYERS",
                   help="concept outputs (CRP) at these layers (comma-separated module names, e.g. features.28): "
                        "each layer's concept relevance and most relevant neurons, and concept maps")
    p.add_argument("--concept-maps", type=int, default=8, metavar="K",
                   help="with --concepts: each image's K most relevant channels' conditional maps (0 = none)")
    p.add_argument("--concept-maps-layer", default=None, help="with --concepts: the maps' layer (default: the first)")
    p.add_argument("--include-parallel", action="store_true",
                   help="with --concepts: keep relevance reaching the input around the conditioned layer "
                        "(CRP's exclude_parallel=False)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    config = ExportConfig(
        model=args.model, weights=args.weights, composite=args.composite, top_k=args.top_k,
        rescale_top_k=args.rescale_top_k, height=args.size[0], width=args.size[1],
        channel_sum=not args.per_channel, formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        num_classes=args.num_classes,
        concepts=ConceptRequest(tuple(name.strip() for name in args.concepts.split(",") if name.strip()),
                                args.concept_maps_layer, args.concept_maps, not args.include_parallel)
        if args.concepts is not None else None,
    )
    try:
        record = export_artifacts(config, args.out, verify=not args.no_verify)
    except VerificationError as error:  # the files are there, one differs: like a run with failed images
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ExportError, WeightsError, ArtifactError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for fmt, name in record["artifacts"].items():
        check = (record["verification"] or {}).get(fmt)
        print(f"{fmt:<13s} {args.out}/{name}  {check['message'].split(': ', 1)[1] if check else '(not verified)'}")
    if record["metadata"]["weights"]["kind"] == "random":
        print("WARNING: these artifacts use RANDOM weights", file=sys.stderr)
    print(json.dumps({"sidecar": f"{args.out}/lrp.json"}))
    return 0
