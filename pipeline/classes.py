"""Class lists: a user's (--classes FILE; ILSVRC-2012's is pipeline/class_list.py), and the model's classes as a
run uses them, checked against a labelled dataset before any work."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lrp_module import demo_model

from .class_list import imagenet_classes
from .datasets.records import DatasetError
from .errors import PipelineError

WNID = re.compile(r"n\d{8}")


class ClassesError(PipelineError, ValueError):
    """A class list (--classes FILE) cannot be read or does not fit the model; the message names the file."""


@dataclass(frozen=True)
class ModelClasses:
    """The model's classes as a run uses them: how many (the artifact's logits), their names and WordNet ids where
    known (None: predictions are class indices only, no names are made up), and where the names came from."""

    count: int
    names: tuple[str, ...] | None = None
    wnids: tuple[str, ...] | None = None
    source: str = "none"

    def record(self) -> dict:
        """For the manifest (`"classes"`): what the report, SpRAy and ViRelAy's label map read (read back by
        run_manifest.Manifest.from_record)."""
        return {"count": self.count, "source": self.source, "names": list(self.names) if self.names else None,
                "wnids": list(self.wnids) if self.wnids else None}


def read_classes_file(path: str | Path) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """A user's class list: one name per line (line i names class i), or tab-separated `index<TAB>wnid<TAB>name`
    lines as configs/imagenet_classes.tsv. Blank lines and lines starting with '#' are skipped. Returns the names
    and the wnids (None for a list of names)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ClassesError(f"{path}: cannot read the class list ({type(error).__name__}: "
                           f"{getattr(error, 'strerror', None) or error})") from None
    lines = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ClassesError(f"{path}: no class names (one name per line, or index<TAB>wnid<TAB>name)")
    tsv = "\t" in lines[0][1]
    names, wnids = [], []
    for n, line in lines:
        if tsv:
            cells = line.split("\t")
            if len(cells) != 3 or cells[0].strip() != str(len(names)) or not WNID.fullmatch(cells[1].strip()):
                raise ClassesError(f"{path}:{n}: expected {len(names)}<TAB>wnid<TAB>name (as "
                                   f"configs/imagenet_classes.tsv), got {line[:60]!r}")
            wnids.append(cells[1].strip())
            line = cells[2]
        elif "\t" in line:
            raise ClassesError(f"{path}:{n}: a tab in a list of names (the first line has none): {line[:60]!r}")
        names.append(line.strip())
    if not all(names):
        raise ClassesError(f"{path}:{lines[names.index('')][0]}: empty class name")
    return tuple(names), tuple(wnids) if tsv else None


def model_classes(count: int, model: str, artifact_names: list[str] | None, classes_file: str | None,
                  imagenet_head: bool) -> ModelClasses:
    """The model's classes: the --classes file's (it must list `count`), else the artifact's names (ImageNet's
    weights, the demo models'), else ImageNet's for a 1000-class torchvision head (`imagenet_head`: random weights
    or a state-dict file of the ImageNet architecture), else none."""
    imagenet = imagenet_classes()
    if classes_file:
        names, wnids = read_classes_file(classes_file)
        if len(names) != count:
            raise ClassesError(f"{classes_file}: lists {len(names)} classes but model {model} has {count} "
                               "(its logits)")
        source = f"file {classes_file}"
    elif artifact_names and len(artifact_names) == count:
        names, wnids, source = tuple(artifact_names), None, "artifact"
        if model in demo_model.NAMES:
            wnids = tuple(demo_model.class_wnids(model))
    elif imagenet_head and count == len(imagenet.names):
        names, wnids, source = imagenet.names, imagenet.wnids, "imagenet (a 1000-class head)"
    else:
        return ModelClasses(count)
    if wnids is None and names == imagenet.names:
        wnids = imagenet.wnids
    return ModelClasses(count, names, wnids, source)


def check_classes(records, classes: ModelClasses, model: str, root: str) -> None:
    """Stop before any work when the dataset's labels are not the model's classes (a shapes dataset explained by
    an ImageNet model, an ImageNet-labelled dataset by a 10-class fine-tune, or the reverse): label index i must
    be one of the model's classes and, where the model's classes are named, name its class i (by wnid where both
    have one). A model without class names cannot be told to have ImageNet's (wnid) classes."""
    seen: set[tuple[int, str | None, str | None]] = set()
    for record in records:
        if record.label is None or (record.label, record.label_name, record.wnid) in seen:
            continue
        seen.add((record.label, record.label_name, record.wnid))
        culprit = f"{root}: the dataset's class {record.label} is {record.label_name!r} ({record.wnid})"
        if not 0 <= record.label < classes.count:
            raise DatasetError(f"{culprit} but model {model} has {classes.count} classes (0-{classes.count - 1}): "
                               "the model was not trained on this dataset's classes")
        if classes.names is None:
            if record.wnid is not None and WNID.fullmatch(record.wnid):
                raise DatasetError(f"{culprit}, an ImageNet class, but model {model}'s {classes.count} classes "
                                   "have no names: name them with --classes FILE, or explain unlabelled "
                                   "(--layout plain)")
            continue
        if classes.wnids is not None and record.wnid is not None and WNID.fullmatch(record.wnid):
            match = classes.wnids[record.label] == record.wnid
            model_has = f"{classes.names[record.label]!r} ({classes.wnids[record.label]})"
        else:
            match = classes.names[record.label] == record.label_name
            model_has = f"{classes.names[record.label]!r}"
        if not match:
            raise DatasetError(f"{culprit} but model {model}'s is {model_has}: the model was not trained on this "
                               "dataset's classes (DATASET=shapes goes with MODEL=vgg-shapes)")


def class_indices(text: str | None, error: type[Exception]) -> tuple[int, ...] | None:
    """A `--classes 3,7` option's class indices, each once in the given order (None when not given); anything else
    is `error` naming the text."""
    if not text:
        return None
    try:
        return tuple(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise error(f"--classes must be comma-separated class indices, got {text!r}") from None
