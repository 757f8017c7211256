"""The report's "Corrections" section: each R-/P-ClArC correction `make correct` made from the run (its record in
RUN/corrections/, docs/audit.md#correction) as a before/after table: accuracy, predictions changed and the
activations' component along the artifact's direction, and the share of images the gate projects, on the marked
and the clean images it was fitted on."""
from __future__ import annotations

import json
from pathlib import Path

from ..layout import CORRECTION_FILE, RunLayout
from . import html
from .run_data import ReportError
from .tables import fmt

HEADINGS = ["corrected model", "layer", "images", "accuracy before", "accuracy after", "predictions changed",
            "along the direction before", "along the direction after", "projected"]


def load(root: Path) -> list[dict]:
    """The run's correction records, by file name; [] when it has none; ReportError naming an unreadable one."""
    folder = RunLayout(root).corrections
    if not folder.is_dir():
        return []
    records = []
    for path in sorted(folder.iterdir()):
        if not CORRECTION_FILE.match(path.name):
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            record["before_after"]["marked"], record["before_after"]["clean"]  # noqa: B018 (the figures must exist)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ReportError(f"{path}: unreadable correction record ({error!r})") from None
        records.append(record)
    return records


def _percent(value) -> str:
    return "–" if value is None else f"{100 * float(value):.1f} %"


def _projected(record: dict, group: str) -> str:
    """The share of the group's images the correction projects: all of them ungated (and in records from before
    the gate), those whose artifact score passes the threshold gated."""
    gate = record.get("gate") or {"threshold": None}
    return "all (ungated)" if gate.get("threshold") is None else _percent(gate.get(f"{group}_projected"))


def rows(records: list[dict]) -> list[list[str]]:
    """Two rows per correction: its marked images, then its clean ones."""
    out = []
    for record in records:
        name = Path(record.get("out", "?")).name
        for group in ("marked", "clean"):
            figures = record["before_after"][group]
            count = record.get("images", {}).get(group)
            out.append([name, record.get("layer", "?"), f"{group}: {fmt(count)}",
                        _percent(figures.get("accuracy_before")), _percent(figures.get("accuracy_after")),
                        _percent(figures.get("predictions_changed")), fmt(figures.get("along_direction_before")),
                        fmt(figures.get("along_direction_after")), _projected(record, group)])
    return out


def section(records: list[dict]) -> str:
    """The section's HTML (the caller adds it only when there are records)."""
    note = ("R-ClArC / P-ClArC (h' = h - v v^T (h - z) at the layer, in the images whose artifact score passes the "
            "gate, or in all ungated): accuracy over the labelled images, the share of predictions the correction "
            "changed, the mean component of the layer's activations along v relative to the clean mean z (0 after, "
            "in the projected images), and the share of images projected, on the images the direction was fitted on "
            "(in-sample). Re-audit a corrected model "
            "with the command in its correction.json.")
    return html.section("corrections", "Corrections", html.table(HEADINGS, rows(records)), note)
