"""Trust in cached LRP artifacts: loading TorchScript runs what is in the file, so the pipeline only loads a
cached artifact that this project built, verified and recorded. When it builds one it writes the sha256 of the
artifact and its sidecar to `lrp.sha256`; a cached artifact is used only when those hashes still match and the
files are the current user's own, not links, not writable by anyone else. Anything else is rebuilt, never loaded.
"""
from __future__ import annotations

import os
from pathlib import Path

from lrp_module.files import atomic, sha256_file

TRUST_FILE = "lrp.sha256"


def record_trust(files: list[Path], record: str = TRUST_FILE) -> None:
    """Record the hashes of files this project has just built (in `record`, beside the first one)."""
    trust = files[0].parent / record
    with atomic(trust) as tmp:
        tmp.write_text("".join(f"{sha256_file(path)}  {path.name}\n" for path in files))


def untrusted_reason(files: list[Path], record: str = TRUST_FILE) -> str | None:
    """Why the cached files may not be loaded, or None when they are exactly what this project built."""
    directory = files[0].parent
    trust = directory / record
    if not trust.is_file():
        return f"no {record} record that this project built it"
    for path in (directory, trust, *files):
        if path.is_symlink():
            return f"{path} is a link"
        status = path.stat()
        if status.st_uid != os.getuid():
            return f"{path} belongs to another user"
        if status.st_mode & 0o002:
            return f"{path} is writable by anyone"
    lines = [line.split("  ", 1) for line in trust.read_text().splitlines() if "  " in line]
    recorded = {name: digest for digest, name in lines}
    for path in files:
        if recorded.get(path.name) != sha256_file(path):
            return f"{path.name} differs from what was built (sha256 mismatch)"
    return None
