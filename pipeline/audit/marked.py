"""Which of a run's images are marked as carrying an artifact (a CSV of image ids, or the images of one prototype:
RUN/prototypes/images.parquet), and which truly do where that is known (a CSV of image ids with a 0/1 column): as
boolean arrays over the run's images. Every check is made before anything is computed or written."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import PipelineError
from ..layout import PROTOTYPE_IMAGES, RunLayout

ID_COLUMN = "image_id"
TRUTH_COLUMN = "truth"  # the truth CSV's 0/1 column; else its one column besides image_id (e.g. hans.csv's `tag`)


class MarkedError(PipelineError, ValueError):
    """A marked set or a truth file that cannot be used (the message names it and why)."""


def _read_csv(path: str | Path, what: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype={ID_COLUMN: str})
    except (OSError, ValueError, pd.errors.ParserError) as problem:
        raise MarkedError(f"{path}: unreadable {what} CSV ({problem})") from None
    if ID_COLUMN not in table.columns:
        raise MarkedError(f"{path}: the {what} CSV has no `{ID_COLUMN}` column (found: "
                          f"{', '.join(map(str, table.columns)) or 'none'})")
    return table


def _as_marks(ids: Sequence[str], run_ids: Sequence[str], source: str) -> np.ndarray:
    """(N,) bool over the run's images; the ids must all be the run's, and at least one."""
    wanted = pd.Index(pd.unique(pd.Series(list(ids), dtype=object).dropna().astype(str)))
    if wanted.empty:
        raise MarkedError(f"{source}: the marked set is empty")
    known = pd.Index(run_ids)
    missing = wanted.difference(known)
    if len(missing):
        shown = ", ".join(missing[:5])
        raise MarkedError(f"{source}: {len(missing)} marked image id(s) not in the run ({shown}"
                          f"{' ...' if len(missing) > 5 else ''})")
    return known.isin(wanted)


def marked_from_csv(path: str | Path, run_ids: Sequence[str]) -> np.ndarray:
    """The images of the CSV's `image_id` column (other columns ignored)."""
    return _as_marks(_read_csv(path, "marked")[ID_COLUMN].tolist(), run_ids, str(path))


def parse_prototype(text: str) -> tuple[int, int]:
    """`CLASS:K` -> (class, prototype)."""
    try:
        klass, prototype = (int(part) for part in text.split(":"))
    except ValueError:
        raise MarkedError(f"--prototype must be CLASS:K (class index, prototype number), got {text!r}") from None
    return klass, prototype


def marked_from_prototype(layout: RunLayout, text: str, run_ids: Sequence[str]) -> np.ndarray:
    """The images of prototype K of class CLASS: those `make prototypes` assigned to it (RUN/prototypes/images.parquet,
    its columns prototype, class, image_id)."""
    klass, prototype = parse_prototype(text)
    path = layout.prototypes / PROTOTYPE_IMAGES
    if not path.is_file():
        raise MarkedError(f"{path}: no prototypes table (make the prototypes first: make prototypes RUN=...)")
    try:
        table = pd.read_parquet(path, columns=["prototype", "class", ID_COLUMN])
    except (OSError, pa.ArrowException, KeyError, ValueError) as problem:
        raise MarkedError(f"{path}: unreadable prototypes table ({problem})") from None
    of_class = table[table["class"] == klass]
    if of_class.empty:
        raise MarkedError(f"{path}: no prototype of class {klass} (classes: "
                          f"{', '.join(map(str, sorted(table['class'].dropna().unique()))) or 'none'})")
    chosen = of_class[of_class["prototype"] == prototype]
    if chosen.empty:
        raise MarkedError(f"{path}: class {klass} has no prototype {prototype} (its prototypes: "
                          f"{', '.join(map(str, sorted(of_class['prototype'].unique())))})")
    return _as_marks(chosen[ID_COLUMN].astype(str).tolist(), run_ids, f"{path} prototype {klass}:{prototype}")


def truth_from_csv(path: str | Path, run_ids: Sequence[str]) -> tuple[np.ndarray, int]:
    """((N,) float64 over the run's images: 1, 0, NaN where the CSV does not say; the CSV's ids not in the run).
    The 0/1 column is `truth`, else the one column besides image_id."""
    table = _read_csv(path, "truth")
    others = [c for c in table.columns if c != ID_COLUMN]
    column = TRUTH_COLUMN if TRUTH_COLUMN in others else (others[0] if len(others) == 1 else None)
    if column is None:
        raise MarkedError(f"{path}: the truth CSV needs a `{TRUTH_COLUMN}` column or exactly one column besides "
                          f"`{ID_COLUMN}` (found: {', '.join(map(str, others)) or 'none'})")
    values = pd.to_numeric(table[column], errors="coerce")
    if values.isna().any() or not values.isin((0, 1)).all():
        raise MarkedError(f"{path}: column `{column}` must hold 0 or 1 in every row")
    if table[ID_COLUMN].duplicated().any():
        raise MarkedError(f"{path}: image id {table[ID_COLUMN][table[ID_COLUMN].duplicated()].iloc[0]} appears twice")
    by_id = pd.Series(values.to_numpy(np.float64), index=table[ID_COLUMN].astype(str))
    truth = by_id.reindex(pd.Index(run_ids)).to_numpy(np.float64)
    outside = int((~by_id.index.isin(pd.Index(run_ids))).sum())
    known = truth[~np.isnan(truth)]
    if not len(known):
        raise MarkedError(f"{path}: no image id of the truth CSV is in the run")
    return truth, outside
