"""Atomic file writes and file hashing, shared by export, the pipeline, its report and the model zoo.

In lrp_module, the lowest layer, so that every other part can import it: a file is written under a temporary name
(`temporary_name`) in its own folder and renamed when complete, so a final name only ever holds a complete file,
and a run folder's clean-up knows every unfinished file by that one name pattern.
"""
from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMPORARY_PREFIX = ".tmp-"  # temporary_name(): .tmp-<pid>-<final name>


class OutputError(OSError):
    """A file cannot be written (disk full, read-only disk, missing folder, ...); the message names the file."""


def temporary_name(name: str) -> str:
    """The name a file is written under before it is renamed to `name` (keeps the suffix: torch.export needs .pt2)."""
    return f"{TEMPORARY_PREFIX}{os.getpid()}-{name}"


def temporary_path(path: Path) -> Path:
    """`path`'s temporary name, in the same folder (so the rename is atomic)."""
    return path.with_name(temporary_name(path.name))


def reason(error: BaseException) -> str:
    """A one-line reason for a failed write ("no space left on device", "Permission denied", ...)."""
    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "errno = 28" in text:
        return "no space left on device"
    if getattr(error, "strerror", None):
        return error.strerror
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """A temporary name to write `path` under; renamed to `path` when the block completes, removed when it
    fails, so that a final name only ever holds a complete file. Write errors become OutputError."""
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OutputError):
            raise
        # h5py raises RuntimeError, not OSError, when HDF5 cannot flush its metadata to a full disk
        full = isinstance(error, RuntimeError) and reason(error) == "no space left on device"
        if isinstance(error, OSError) or full:
            raise OutputError(f"cannot write {path}: {reason(error)}") from error
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` as UTF-8, atomically (see `atomic`)."""
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 hex digest of a file, read in chunks (weights and artifacts are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
