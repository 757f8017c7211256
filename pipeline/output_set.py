"""An output folder replaced as a whole set (the report, SpRAy's results): checked before any work, built in a
temporary sibling folder and swapped in when complete, so a failed or killed build leaves the previous set intact
(never an index.html whose pictures are gone), and a folder holding files its writer did not write is refused,
never emptied. Write errors (a full disk) become one OutputError naming the final folder."""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lrp_module.files import TEMPORARY_PREFIX, OutputError, reason

OLD_SUFFIX = ".old"  # the previous set, renamed aside for the moment of the swap
SHOWN = 3  # foreign files named in a refusal

Owner = Callable[[Path], set[str]]  # folder -> the relative (posix) paths of the files its writer wrote there


def files_in(folder: Path) -> list[str]:
    """Every file (and link) under `folder`, as relative posix paths, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def check_replaceable(out: Path, own: Owner, what: str) -> None:
    """OutputError unless `out` is missing, an empty folder, or holds only files `own` says the writer wrote."""
    out = Path(os.path.abspath(out))  # "." or "x/.." have no name to put a sibling beside
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"{out}: not a folder; the {what} needs a new or empty folder, or one of its own")
    foreign = sorted(set(files_in(out)) - own(out))
    if foreign:
        named = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else "")
        raise OutputError(f"{out}: holds files the {what} did not write ({named}); nothing was changed: "
                          "choose a new or empty folder, or move them")


def _building(out: Path, pid: int | None = None) -> Path:
    return out.parent / f"{TEMPORARY_PREFIX}{pid or os.getpid()}-{out.name}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(out: Path) -> None:
    """What a killed build of `out` left beside it: its unfinished folder is removed; a previous set renamed aside
    at the moment of a swap is put back when `out` is missing, else removed."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"^{re.escape(TEMPORARY_PREFIX)}(\d+)-{re.escape(out.name)}({re.escape(OLD_SUFFIX)})?$")
    for path in sorted(out.parent.iterdir()):
        match = pattern.match(path.name)
        if not match or not path.is_dir() or path.is_symlink() or _alive(int(match.group(1))):
            continue
        if match.group(2) and not out.exists():
            os.replace(path, out)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _remove_own(folder: Path, own: Owner) -> None:
    """Delete the writer's own files in `folder`, then the folders this left empty (anything else stays)."""
    for name in own(folder):
        (folder / name).unlink(missing_ok=True)
    for path in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        if not any(path.iterdir()):
            path.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


def _swap(build: Path, out: Path, own: Owner) -> None:
    if out.exists():
        old = build.with_name(build.name + OLD_SUFFIX)
        os.replace(out, old)
        os.replace(build, out)
        _remove_own(old, own)
    else:
        os.replace(build, out)


@contextmanager
def replaced_as_set(out: Path, own: Owner, what: str) -> Iterator[Path]:
    """A fresh folder to write the whole set into; swapped in for `out` when the block completes, removed when it
    fails (the previous set stays as it was). `out` is checked first (check_replaceable)."""
    out = Path(os.path.abspath(out))
    check_replaceable(out, own, what)
    build = _building(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out)
        build.mkdir()
    except OSError as error:
        raise OutputError(f"cannot write the {what} {out}: {reason(error)}") from None
    try:
        yield build
        _swap(build, out, own)
    except BaseException as error:
        shutil.rmtree(build, ignore_errors=True)
        if isinstance(error, OSError):
            text = str(error).replace(str(build), str(out)) if isinstance(error, OutputError) else reason(error)
            raise OutputError(text if isinstance(error, OutputError) else
                              f"cannot write the {what} {out}: {text}") from None
        raise
