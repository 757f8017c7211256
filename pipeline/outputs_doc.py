"""Writes docs/outputs.md from the code that defines a run folder: the files from `RunLayout` (which of them
`--overwrite` deletes is asked of `RunLayout.own_files` itself) and the columns from `STATS_SCHEMA` /
`FAILURE_SCHEMA` (names, types, docs), so the page cannot drift; `tests/test_docs.py` fails when it is stale.

Run `python -m pipeline.outputs_doc` (or `make docs`) after changing either."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pyarrow as pa

from .audit.cav_outputs import CHANNELS_SCHEMA as CAV_CHANNELS_SCHEMA
from .audit.cav_outputs import IMAGES_SCHEMA as CAV_IMAGES_SCHEMA
from .audit.cav_outputs import VECTORS_SCHEMA as CAV_VECTORS_SCHEMA
from .audit.prototype_schema import PROTOTYPE_IMAGE_SCHEMA, PROTOTYPE_SCHEMA
from .concepts import outputs as concept_outputs
from .layout import REPORT_OWN_FILES, RunLayout, shard_name
from .sanity.schema import SANITY_SCHEMA
from .schema import FAILURE_SCHEMA, RELMAX_SCHEMA, STATS_SCHEMA

DOC = Path(__file__).resolve().parent.parent / "docs" / "outputs.md"
COMMAND = "python -m pipeline.outputs_doc"

# What each file of a run folder holds, by its name in the folder (`{shard}` stands for shard-00042). Every name is
# checked against RunLayout when the page is written: a name the layout does not know stops the generator.
FILES: dict[str, str] = {
    "run.json": "the configuration's identity, written when the run starts: what marks a folder as a run folder",
    "relevance/{shard}.h5": "`relevance` (N, H, W) maps, float16 by default (`map_dtype: float32` on request; "
                            "float16 keeps ~3 significant digits and flushes values below 6e-5, which matters for "
                            "random weights' tiny maps), one image per chunk, gzip + shuffle; beside it `image_id`, "
                            "`path`, `label` (-1: none), `pred`, `target`; the configuration as attributes; with "
                            "concepts, the concept datasets below",
    "stats/{shard}.parquet": "one row per explained image, the columns below",
    "failures/{shard}.parquet": "the shard's images that could not be read or explained, the failure columns below",
    "relevance.h5": "an HDF5 virtual dataset presenting all shards as one (N, H, W) `relevance` in dataset order: it "
                    "holds no maps, reads `relevance/shard-*.h5` relative to itself, and a copy without those "
                    "shards reads as NaN without an error (HDF5's fill value); its attributes `note` and `shards` "
                    "say so. Copy or move the run folder whole",
    "relmax.parquet": "with concepts: relevance maximisation (CRP's RelMax) and per-class statistics (RelStats), "
                      "merged from every shard when the run finishes; the RelMax columns below",
    "crp/RelMax_sum_normed/features.28_data.npy": "with concepts: relmax.parquet again in zennit-crp's `.npy` "
                                                  "layout: `RelMax_sum_normed/<layer>_{data,rel,rf}.npy` and "
                                                  "`RelStats_sum_normed/<layer>/<class>_{data,rel,rf}.npy` with "
                                                  "`RelStats_sum_normed/targets.npy`; each (n, C): the image's "
                                                  "index in the dataset order, the value, the neuron",
    "failures.parquet": "every image that could not be read or explained, with the reason (all shards' failures)",
    "precision.json": "the precision probe: shard 0's first images (one per 200 images of the run, 1 to 8) as the "
                      "actor computed them in float32, against float64 on the driver's CPU with eager `LRPModel`, "
                      "computed beside the run; records `reference`, `images`, `device`, the "
                      "numeric settings (`dtype`, `tf32`, `cudnn_benchmark`, `cudnn_deterministic`, `onednn`), "
                      "`max_relative_error` {`max`, `median`} and `correlation` {`min`, `median`}; also in the "
                      "manifest's `\"precision\"` ([correctness.md](correctness.md))",
    "manifest.json": "configuration, versions, weights and their hash, the artifact's metadata, the model's classes, "
                     "the dataset's layout and files, shards with row counts, sha256 and provenance (node, process, "
                     "invocation), totals, failure reasons, retries, the precision probe, every invocation's timing",
    "_SUCCESS": "written last, when every shard is done",
    "run.lock": "present while a process (`explain`, `report`, `heatmaps`, `spray`, `sanity`, `prototypes`, `cav`, "
                "`correct`) uses the folder ([reliability.md](reliability.md#one-process-per-run-folder)); "
                "`--overwrite` leaves it to its holder",
    "report/index.html": "the audit report (`make report`, [report.md](report.md))",
    f"report/{REPORT_OWN_FILES}": "the list of the files the report wrote",
    "report/img/tile.png": "the report's pictures (`.png`, `.jpg`)",
    "heatmaps/ID-heatmap.png": "`make heatmaps`: `<id>-heatmap.png`, `<id>-image.png`, `<id>-overlay.png`",
    "concept-references/features.28-c7-grid.png": "`make concepts`: per channel of the layer, "
                                                   "`<layer>-c<channel>[-k<class>]-grid.png` (the "
                                                   "reference crops above their conditional maps) and per "
                                                   "reference `...-r<rank>-image.png` and `...-r<rank>-heatmap.png`",
    "spray/clusters.parquet": "`make spray` ([spray.md](spray.md)): each image's strategy cluster per k, the 2-D "
                              "picture, an outlier score",
    "spray/summary.json": "per class: eigengap, k*, cluster sizes, candidates, skipped classes",
    "spray/cluster_means.h5": "each cluster's mean map (the report's Strategies section)",
    "spray/project.yaml": "the ViRelAy project (with `label-map.json`, `attribution.h5`, `dataset.h5`, "
                          "`analysis.h5`)",
    "prototypes/images.parquet": "`make prototypes` ([concepts.md](concepts.md#prototypes-pcx)): per image of a "
                                 "run with concepts, its class's prototype, log-likelihood, outlier rank and the "
                                 "concepts it uses more or less than its prototype: the prototype image columns "
                                 "below",
    "prototypes/prototypes.parquet": "per class and prototype: weight, closest images, mean concept profile: the "
                                     "prototype columns below",
    "prototypes/summary.json": "the layer, the settings, per class the number of prototypes BIC chose (and BIC for "
                               "each number tried), the principal components used, skipped classes and why",
    "sanity.parquet": "`make sanity` ([sanity.md](sanity.md)): the model parameter randomisation test (MPRT, "
                      "eMPRT) on a sample of the run's images, one row per image, mode and layer randomised: the "
                      "sanity columns below",
    "cav/artifact-images.parquet": "`make cav` ([audit.md](audit.md)), per artifact concept NAME (`--name`, "
                                   "default `artifact`): every image of the run with its score and rank on each CAV, "
                                   "marked, truth, R_bias: the CAV image columns below",
    "cav/artifact-channels.parquet": "per channel of the layer: its AUROC for the marked set (the best single "
                                     "channels), its CAV components: the CAV channel columns below",
    "cav/artifact-vectors.parquet": "the CAVs (pattern, classifier): layer, unit vector, the clean and the marked "
                                    "images' means: the CAV vector columns below",
    "cav/artifact.json": "what was marked, the settings, the best channels, retrieval AUROC / AP against the truth, "
                         "mean R_bias, timings",
    "corrections/run-pclarc-features.12.json": "`make correct` ([audit.md](audit.md#correction)): per corrected "
                                               "model, named after its folder, the same record as its "
                                               "`correction.json` (the direction, the reference, the before/after "
                                               "figures; the report's Corrections section)",
    ".tmp-1234-manifest.json": "a file being written (`.tmp-<pid>-<name>`); renamed when complete, swept by the "
                               "next run",
}
# files RunLayout must count as the run's own although the table names only one of them
ALSO_OWN = ("crp/RelMax_sum_normed/features.28_rel.npy", "crp/RelMax_sum_normed/features.28_rf.npy",
            "crp/RelStats_sum_normed/features.28/281_data.npy", "crp/RelStats_sum_normed/targets.npy",
            "heatmaps/ID-image.png", "heatmaps/ID-overlay.png", "report/img/tile.jpg", "spray/label-map.json",
            "spray/attribution.h5", "spray/dataset.h5", "spray/analysis.h5",
            "concept-references/features.28-c7-k3-r0-image.png", "concept-references/features.28-c7-r0-heatmap.png")
USER_FILE = "notes.txt"  # what a user keeps in OUT: never the run's


def _actual(name: str) -> str:
    return name.replace("{shard}", shard_name(42))


def own_files() -> set[str]:
    """The documented names that RunLayout counts as the run's own, asked of RunLayout on a scratch folder."""
    with tempfile.TemporaryDirectory() as scratch:
        layout = RunLayout(scratch)
        for name in (*map(_actual, FILES), *ALSO_OWN, USER_FILE):
            path = Path(scratch) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        own = {layout.relative(path) for path in layout.own_files()}
    unknown = sorted({*map(_actual, FILES), *ALSO_OWN} - own)
    if unknown or USER_FILE in own:
        raise SystemExit(f"docs/outputs.md: RunLayout does not count {', '.join(unknown) or USER_FILE} as the run's "
                         f"own file; update FILES in pipeline/outputs_doc.py")
    return own


def _type(kind: pa.DataType) -> str:
    return str(kind).replace("<item: ", "<").replace("list<element: ", "list<")


def _columns(schema: pa.Schema) -> list[str]:
    rows = ["| column | type | null | what it holds |", "|---|---|---|---|"]
    for field in schema:
        doc = (field.metadata or {}).get(b"doc", b"").decode()
        if not doc:
            raise SystemExit(f"docs/outputs.md: column {field.name} has no doc in pipeline/schema.py")
        rows.append(f"| `{field.name}` | {_type(field.type)} | {'yes' if field.nullable else 'no'} | "
                    f"{doc.replace('|', '/')} |")
    return rows


def render() -> str:
    """The page's text."""
    own_files()
    files = ["| file | what it holds |", "|---|---|"]
    files += [f"| `{_actual(name).replace(shard_name(42), 'shard-NNNNN')}` | {doc} |" for name, doc in FILES.items()]
    return "\n".join([
        f"<!-- generated by `{COMMAND}` from pipeline/layout.py and pipeline/schema.py: do not edit -->",
        "# Outputs: the run folder",
        "",
        "Everything `make explain` writes goes into `OUT` (default `runs/<dataset>-<model>-<composite>`). Every file",
        "is written under a temporary name and renamed when complete; a shard is done when its three files exist.",
        "Names come from `RunLayout` (`pipeline/layout.py`), columns from `STATS_SCHEMA` (`pipeline/schema.py`),",
        "where every column is declared once with its type and this description (also stored as each Parquet",
        "field's `doc` metadata).",
        "",
        "## Files",
        "",
        *files,
        "",
        "`--overwrite` deletes only these files (the lock aside) and removes a folder only when that leaves it empty;",
        "anything else in OUT stays. Reruns, locks and exit codes: [reliability.md](reliability.md).",
        "",
        "## Statistics columns (`stats/shard-NNNNN.parquet`)",
        "",
        "Joinable with the maps: `shard` and `row` name the map's file and row. Localisation columns need boxes,",
        "faithfulness columns `faithfulness: true`; the pixel-flipping method:",
        "[correctness.md](correctness.md#faithfulness-pixel-flipping); `conservation` and `absorbed`:",
        "[correctness.md](correctness.md#conservation).",
        "",
        *_columns(STATS_SCHEMA),
        "",
        "## Failure columns (`failures.parquet`, `failures/shard-NNNNN.parquet`)",
        "",
        *_columns(FAILURE_SCHEMA),
        "",
        "## Concepts (CRP): `concepts:` in configs/run.yaml, `CONCEPTS=features.28`",
        "",
        "A run with concept layers adds to each relevance shard (and, as virtual datasets over all shards, to",
        "`relevance.h5`), row for row with its `relevance` maps; the shard's attribute "
        f"`{concept_outputs.ATTRIBUTE}` (JSON) names",
        "the layers with their channels and output grid (`height`, `width`), `maps_layer`, `maps` (K) and",
        "`exclude_parallel` ([datasets.md](datasets.md#concepts)):",
        "",
        "| dataset | shape, type | what it holds |",
        "|---|---|---|",
        f"| `{concept_outputs.relevance_name('LAYER')}` | (N, C) float32 | the relevance at each channel of the "
        "layer's output, summed over space (not normalised; share = value / sum of abs over C) |",
        f"| `{concept_outputs.position_name('LAYER')}` | (N, C) int32 | each channel's most relevant neuron: the "
        "flat position (row * width + col) of the arg-max of its relevance over the layer's grid |",
        f"| `{concept_outputs.CHANNELS}` | (N, K) int64 | the maps layer's K most relevant channels, most relevant "
        "first |",
        f"| `{concept_outputs.MAPS}` | (N, K, H, W) `map_dtype`, gzip + shuffle, one image per chunk | their "
        "conditional maps (`{maps_layer: [channel]}`; the unconditional map stays `relevance`) |",
        "",
        "The statistics' `concepts_*` columns above list each layer's top channels and their shares.",
        "",
        "## RelMax columns (`relmax.parquet`)",
        "",
        "For every layer and channel the `concepts.relmax` images with the largest normalised concept relevance",
        "(CRP's RelMax), over all images (`class` null) and per class explained (RelStats); merged from the shards",
        "(pipeline/concepts/tables.py), so the same whatever the number of actors or invocations.",
        "",
        *_columns(RELMAX_SCHEMA),
        "",
        "## Prototype image columns (`prototypes/images.parquet`)",
        "",
        "Written by `make prototypes RUN=...`; the method: [concepts.md](concepts.md#prototypes-pcx). One row per",
        "image of each analysed class, class by class, dataset order within a class; join the statistics on",
        "`image_id`.",
        "",
        *_columns(PROTOTYPE_IMAGE_SCHEMA),
        "",
        "## Prototype columns (`prototypes/prototypes.parquet`)",
        "",
        *_columns(PROTOTYPE_SCHEMA),
        "",
        "## Sanity columns (`sanity.parquet`)",
        "",
        "Written by `make sanity RUN=... N=...`; the protocol and its parameters: [sanity.md](sanity.md).",
        "",
        *_columns(SANITY_SCHEMA),
        "",
        "## CAV columns (`cav/NAME-images.parquet`, `cav/NAME-channels.parquet`, `cav/NAME-vectors.parquet`)",
        "",
        "Written by `make cav RUN=... LAYER=... MARKED=ids.csv` (or `PROTOTYPE=CLASS:K`); the method and its choices:",
        "[audit.md](audit.md). Per image (`NAME-images.parquet`, joinable with the statistics on `image_id`):",
        "",
        *_columns(CAV_IMAGES_SCHEMA),
        "",
        "Per channel of the layer (`NAME-channels.parquet`):",
        "",
        *_columns(CAV_CHANNELS_SCHEMA),
        "",
        "Per CAV (`NAME-vectors.parquet`):",
        "",
        *_columns(CAV_VECTORS_SCHEMA),
        "",
        "## Reading a run",
        "",
        "```python",
        "import h5py, pandas as pd, pyarrow.dataset as ds, duckdb",
        'run = "runs/sample-vgg16-epsilon_gamma_box"',
        'stats = pd.read_parquet(f"{run}/stats")                                  # pandas',
        'table = ds.dataset(f"{run}/stats", format="parquet").to_table()          # pyarrow',
        "duckdb.sql(f\"select pred_name, avg(gini) from '{run}/stats/*.parquet' group by 1\").show()",
        'with h5py.File(f"{run}/relevance.h5") as f:                              # all maps as one dataset',
        '    first = f["relevance"][0]',
        "row = stats.iloc[0]",
        'with h5py.File(f"{run}/{row.shard}") as f:                               # one map from its shard',
        '    same = f["relevance"][row.row]',
        "```",
        "",
        "With concepts (a run made with `CONCEPTS=features.28`, say):",
        "",
        "<!-- not run: needs a run with concepts (tests/test_pipeline_concepts.py reads one this way) -->",
        "```python",
        "import h5py, pandas as pd, duckdb",
        'run = "runs/imagenet-val-vgg16-epsilon_gamma_box"',
        'with h5py.File(f"{run}/relevance.h5") as f:',
        '    vectors = f["concept_relevance/features.28"][:]                      # (N, 512), dataset order',
        '    channels, maps = f["concept_channels"][0], f["concept_maps"][0]      # (K,), (K, H, W)',
        'relmax = pd.read_parquet(f"{run}/relmax.parquet")',
        "duckdb.sql(f\"select channel, image_id, value from '{run}/relmax.parquet' \"",
        "           f\"where \\\"class\\\" is null and rank < 3\").show()                      # RelMax, top 3",
        "duckdb.sql(f\"select image_id, concepts_top[1] as best from '{run}/stats/*.parquet'\").show()",
        "```",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    """Write docs/outputs.md (`--check`: exit 1 when the committed page differs)."""
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"docs/outputs.md is stale: run `{COMMAND}` (or `make docs`)", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
