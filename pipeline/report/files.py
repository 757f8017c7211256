"""File names made from image ids (which come from the dataset and may hold '/', '..' or anything): a safe,
unique name that always stays inside the folder it is written to."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

MAX_STEM = 80


def safe_name(image_id: str) -> str:
    """Letters, digits, '-', '_' and '.' only, no leading dot, plus a short hash of the id so that two ids
    that clean to the same text still get different names."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).lstrip(".")[:MAX_STEM] or "image"
    return f"{cleaned}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


def inside(folder: Path, name: str) -> Path:
    """folder / name, refusing any name that would land outside folder (defence in depth behind safe_name)."""
    path = (folder / name).resolve()
    if path.parent != folder.resolve():
        raise ValueError(f"file name {name!r} would leave {folder}")
    return path
