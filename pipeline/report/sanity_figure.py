"""`python -m pipeline.report.sanity_figure RUN OUT.png [--table]`: a run's cascade plot alone (the README's,
docs/sanity-cascade.png) and, with --table, its means per layer as Markdown (docs/sanity.md's figures)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .run_data import ReportError
from .sanity import cascade_plot, load, markdown_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report.sanity_figure",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("png", help="where to write the cascade plot")
    parser.add_argument("--title", default=None)
    parser.add_argument("--table", action="store_true", help="print the means per layer as Markdown")
    args = parser.parse_args(argv)
    try:
        table = load(Path(args.run))
        if table is None:
            raise ReportError(f"{args.run}: no sanity.parquet (run `python -m pipeline sanity RUN --images N`)")
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cascade_plot(table, Path(args.png), args.title)
    if args.table:
        print(markdown_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
