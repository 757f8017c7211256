"""Build the report of a run (RUN/report/index.html + img/) and single heat maps for chosen images. Reads the
statistics columns once, then maps and image files for the shown rows only, so a 50,000-image run stays fast."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from PIL import Image

from lrp_module.files import write_text_atomic

from ..layout import REPORT_IMAGE, REPORT_OWN_FILES, TEMPORARY, RunLayout
from ..output_set import files_in, replaced_as_set
from . import concepts as concepts_section
from . import corrections as corrections_section
from . import html, selection, tables
from . import metrics as metrics_section
from . import prototypes as prototypes_section
from . import sanity as sanity_section
from . import strategies as spray_section
from .files import inside
from .heatmap import DEFAULT_COLOUR_MAP, colour_bar, lookup_table
from .plots import write_plots
from .run_data import ReportError, RunData, open_run, read_maps
from .tiles import TileFiles, members, render, render_rows

IMAGE_FOLDER = "img"


def _caption(row) -> list[str]:
    def name(index, text) -> str:
        return f"{text} ({int(index)})" if isinstance(text, str) else str(int(index))

    lines = []
    if pd.notna(row.label):
        lines.append(f"label: {name(row.label, row.label_name)}")
    lines.append(f"pred: {name(row.pred, row.pred_name)}  p={row.pred_probability:.3g}")
    if int(row.target) != int(row.pred):
        lines.append(f"map for: {int(row.target)}  p={row.target_probability:.3g}")
    return lines


def _tiles(rows: pd.DataFrame, files: dict[str, TileFiles]) -> list[html.Tile]:
    tiles = []
    for row in rows.itertuples(index=False):
        verdict = None if pd.isna(row.correct) else bool(row.correct)
        tiles.append(files[row.image_id].tile(row.image_id, f"{IMAGE_FOLDER}/", _caption(row), verdict))
    return tiles


def _galleries(run: RunData, n: int, per_class: int) -> list[tuple[str, str, str, pd.DataFrame]]:
    """(anchor, title, note, rows) of each gallery."""
    stats = run.stats
    if run.has_labels:
        galleries = [
            ("errors", "Most confident errors", "Wrong predictions with the highest probability.",
             selection.most_confident_errors(stats, n)),
            ("uncertain", "Least confident correct", "Right predictions with the lowest probability.",
             selection.least_confident_correct(stats, n)),
        ]
    else:
        galleries = [
            ("confident", "Most confident predictions", "The run has no labels: highest probability first.",
             selection.most_confident(stats, n)),
            ("uncertain", "Least confident predictions", "The run has no labels: lowest probability first.",
             selection.least_confident(stats, n)),
        ]
    by = "label" if run.has_labels else "predicted class"
    galleries.append(("classes", "Sample per class", f"Up to {per_class} image(s) per {by}, drawn with a fixed seed.",
                      selection.per_class_sample(stats, per_class, run.has_labels)))
    return galleries


def _failures_section(run: RunData) -> str:
    failures = run.failures
    if failures.empty:
        return '<p class="note">No failures.</p>'
    reasons = failures["reason"].astype(str).str.split(":").str[0].value_counts()
    shown = failures.head(200)
    more = f'<p class="note">First 200 of {len(failures):,}; all in failures.parquet.</p>' \
        if len(failures) > 200 else ""
    return (html.table(["reason", "images"], [[r, f"{c:,}"] for r, c in reasons.items()]) + "<br>"
            + html.table(["image id", "path", "reason"],
                         [[str(r.image_id), str(r.path), str(r.reason)] for r in shown.itertuples()]) + more)


OWN_FILES = REPORT_OWN_FILES  # the report's list of the files it wrote: all that a later report may replace


def own_files(folder: Path, default: Path | None = None) -> set[str]:
    """The files of `folder` a report wrote: those its OWN_FILES lists (and that list), or, for a run's default
    report folder made before the list existed, RunLayout's report names. Anything else is the user's."""
    listing = folder / OWN_FILES
    if listing.is_file():
        try:
            names = json.loads(listing.read_text()).get("files", [])
        except (json.JSONDecodeError, OSError, AttributeError):
            return set()
        safe = {n for n in names if isinstance(n, str) and n and not n.startswith("/") and ".." not in n.split("/")}
        return safe | {OWN_FILES}
    if default is None or folder.resolve() != default.resolve():
        return set()
    own = {"index.html"} | {p.name for p in folder.glob("*") if TEMPORARY.match(p.name)}
    return own | {f"{IMAGE_FOLDER}/{p.name}" for p in (folder / IMAGE_FOLDER).glob("*")
                  if (REPORT_IMAGE.match(p.name) or TEMPORARY.match(p.name)) and p.is_file()}


def build_report(run_dir: str | Path, out: str | Path | None = None, per_class: int = 1, gallery: int = 12,
                 cmap: str = DEFAULT_COLOUR_MAP, timings: dict[str, float] | None = None) -> Path:
    """Write the report; returns the path of index.html. `timings`, when given, receives seconds per phase."""
    started = time.perf_counter()
    timings = {} if timings is None else timings
    clock = [started]

    def lap(phase: str) -> None:
        now = time.perf_counter()
        timings[phase] = now - clock[0]
        clock[0] = now

    if per_class < 0 or gallery < 0:
        raise ReportError(f"--per-class and --gallery must be >= 0 (got {per_class}, {gallery})")
    lookup_table(cmap)  # an unknown colour map fails before anything is written
    run = open_run(run_dir)
    default = RunLayout(run.root).report
    out = Path(out) if out else default
    with replaced_as_set(out, lambda folder: own_files(folder, default), "report") as folder:
        shown, plots = _build(run, folder, per_class, gallery, cmap, lap)
        write_text_atomic(folder / OWN_FILES, json.dumps({"written_by": "python -m pipeline report",
                                                          "files": files_in(folder)}, indent=1) + "\n")
    index = out / "index.html"
    timings["total"] = time.perf_counter() - started
    print(f"report: {shown:,} images, {plots} plots in {timings['total']:.1f} s -> {index}")
    return index


def _build(run: RunData, folder: Path, per_class: int, gallery: int, cmap: str, lap) -> tuple[int, int]:
    """Every file of the report, written into `folder` (a fresh folder, swapped in by build_report); returns the
    number of images shown and of plots."""
    images = folder / IMAGE_FOLDER
    images.mkdir()
    lap("read statistics")
    galleries = _galleries(run, gallery, per_class)
    shown = pd.concat([rows for *_, rows in galleries])
    lap("select")
    maps = read_maps(run.root, shown.drop_duplicates("image_id"))
    lap("read maps")
    files = render_rows(shown, maps, images, cmap)
    Image.fromarray(colour_bar(cmap)).save(images / "colour-bar.png")
    lap("render tiles")
    plot_files = write_plots(run.stats, run.list_columns, images, run.has_labels)
    lap("plots")

    missing = sum(1 for f in files.values() if f.problem)
    extra = [("images shown", f"{len(files):,}" + (f" ({missing:,} image files not found or unreadable — dataset "
                                                    "moved? — heat map only)" if missing else ""))]
    strategies = spray_section.load(run.root)  # RUN/spray/, when `make spray` ran
    extra += spray_section.summary_rows(strategies) if strategies else []
    prototypes = prototypes_section.load(run.root)  # RUN/prototypes/, when `make prototypes` ran
    extra += prototypes_section.summary_rows(prototypes) if prototypes else []
    sections = [("summary", "Summary", html.section("summary", "Summary", html.key_values(tables.summary(run, extra))))]
    for anchor, title, note, rows in galleries:
        body = html.gallery(_tiles(rows, files), "None in this run.")
        sections.append((anchor, title, html.section(anchor, title, body, note)))
    if strategies:
        sections.append(("strategies", "Strategies", spray_section.section(run, strategies, images,
                                                                           f"{IMAGE_FOLDER}/", cmap)))
        lap("strategies")
    concepts = concepts_section.load(run.root)  # the run's concept data, when it was explained with concepts
    if concepts:
        sections.append(("concepts", "Concepts", concepts_section.section(run, concepts, images, f"{IMAGE_FOLDER}/",
                                                                          cmap)))
        lap("concepts")
    corrections = corrections_section.load(run.root)  # RUN/corrections/, when `make correct` ran
    if corrections:
        sections.append(("corrections", "Corrections", corrections_section.section(corrections)))
    metrics = metrics_section.section(run.stats, run.has_labels)  # when the run's `metrics` named any
    if metrics:
        sections.append(("metrics", "Evaluation metrics", metrics))
    if prototypes:
        sections.append(("prototypes", "Prototypes", prototypes_section.section(run, prototypes, images,
                                                                                f"{IMAGE_FOLDER}/", cmap)))
        lap("prototypes")
    sanity = sanity_section.load(run.root)  # RUN/sanity.parquet, when `make sanity` ran
    if sanity is not None:
        sections.append(("sanity", "Sanity check", sanity_section.section(sanity, images, f"{IMAGE_FOLDER}/")))
        lap("sanity check")
    sections.append(("distributions", "Distributions", html.section(
        "distributions", "Distributions of the statistics",
        html.plots([(t, f"{IMAGE_FOLDER}/{name}") for t, name in plot_files]),
        "Per-image statistics (stats/*.parquet); wrong and correct predictions overlaid where labels exist.")))
    headings, rows = tables.per_class(run.stats, run.has_labels)
    sections.append(("per-class", "Per class", html.section(
        "per-class", "Per class", html.table(headings, rows) if rows else '<p class="note">No images.</p>',
        "By label" if run.has_labels else "By predicted class (the run has no labels)")))
    sections.append(("failures", "Failures", html.section("failures", "Failures", _failures_section(run))))

    config = run.config
    dataset = config.dataset or Path(config.root or run.root.name).name
    title = " ".join(["LRP audit:", " / ".join(name for name in (config.model, config.composite) if name)
                      or run.root.name, f"on {dataset}"])
    warnings = [] if run.complete else [
        f"INCOMPLETE RUN: no manifest.json or _SUCCESS in {run.root} (stopped, or still running): this report "
        "counts only the shards finished so far; run the same explain command again to finish it."]
    if run.manifest.random_weights:
        warnings.append("RANDOM weights: this run's maps say nothing about a trained model.")
    warning = " ".join(warnings) or None
    write_text_atomic(folder / "index.html", html.page(title, warning, sections, f"{IMAGE_FOLDER}/colour-bar.png"))
    lap("tables and page")
    return len(files), len(plot_files)


def write_heatmaps(run_dir: str | Path, ids: list[str], out: str | Path | None = None,
                   cmap: str = DEFAULT_COLOUR_MAP) -> list[Path]:
    """PNG heat map (and overlay, where the image file is readable) of each chosen image; unknown ids fail before
    anything is written. Returns the files written."""
    ids = [i for i in dict.fromkeys(i.strip() for i in ids) if i]
    if not ids:
        raise ReportError("no image ids given")
    lookup_table(cmap)
    run = open_run(run_dir)
    rows = run.stats[run.stats["image_id"].isin(ids)].drop_duplicates("image_id")
    unknown = [i for i in ids if i not in set(rows["image_id"])]
    if unknown:
        raise ReportError(f"unknown image id(s) in {run.root}: {', '.join(unknown[:10])}"
                          + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    folder = Path(out) if out else RunLayout(run.root).heatmaps
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReportError(f"{folder}: cannot write ({error.strerror or error})") from None
    maps = read_maps(run.root, rows)
    written = []
    for image_id, path, member in zip(rows["image_id"], rows["path"], members(rows)):
        files = render(image_id, path, maps[image_id], folder, cmap, photo_format="png", member=member)
        written += [inside(folder, name) for name in (files.heatmap, files.image, files.overlay) if name]
        if files.problem:
            print(f"{image_id}: {files.problem}: heat map only")
    return written
