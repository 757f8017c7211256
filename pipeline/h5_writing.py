"""An HDF5 file written atomically (lrp_module.files.atomic) that fails cleanly on a full disk: without a chunk cache
every write reaches the disk where it is made and fails there (a cached chunk would be flushed when Python frees its
dataset object, where the failure cannot be caught and leaves libhdf5 to crash the process later with SIGSEGV); the
file is closed before an error propagates, and every write failure is one OutputError naming the final file."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py

from lrp_module.files import OutputError, atomic, reason


def _release(handle: h5py.File, tmp: Path) -> None:
    """Close a file whose write failed: the doomed temporary file is truncated to nothing first, so that libhdf5's
    close can flush its cached chunks into the freed space and release every object (a close that fails for want of
    space leaves objects behind that crash the process when Python frees them later)."""
    try:
        os.truncate(tmp, 0)
    except OSError:
        pass
    try:
        handle.close()
    except (OSError, RuntimeError, ValueError):
        pass


@contextmanager
def h5_atomic(path: Path) -> Iterator[h5py.File]:
    """`path` open for writing under its temporary name; flushed, closed and renamed when the block completes,
    closed and removed when it or the flush fails. A write failure (OSError, or libhdf5's RuntimeError for a full
    disk) is an OutputError naming `path`."""
    with atomic(path) as tmp:
        handle = h5py.File(tmp, "w", rdcc_nbytes=0)  # no chunk cache: a write fails where it is made
        try:
            yield handle
            handle.flush()  # a full disk fails here, while libhdf5 can still close cleanly
        except BaseException as error:
            _release(handle, tmp)
            if isinstance(error, OSError) or "write failed" in str(error) or "errno = 28" in str(error):
                raise OutputError(f"cannot write {path}: {reason(error)}") from None
            raise
        try:
            handle.close()
        except (OSError, RuntimeError) as error:
            _release(handle, tmp)
            raise OutputError(f"cannot write {path}: {reason(error)}") from None
