"""Reading cost per image of WebDataset shards of different sizes (.tar and .tar.gz): the pipeline's reader (the
member's offset from the listing; a compressed shard in one forward pass per actor, run shard by run shard) against
a search of the shard by member name (what every image cost before: the shard opened, its headers scanned, a
.tar.gz decompressed from its start). Part of `make bench-pipeline`; bytes only, no decoding.
"""
from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

RUN_SHARD = 64  # configs/run.yaml shard_size: the records one actor reads per call
KINDS = {".tar": "w", ".tar.gz": "w:gz"}


def _payloads(distinct: int = 32, size: tuple[int, int] = (320, 240)) -> list[bytes]:
    """Photograph-like JPEGs (smooth random colour fields), cycled through the shard."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(distinct):
        image = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def make_shard(path: Path, members: int, payloads: list[bytes]) -> None:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for n in range(members):
            data = payloads[n % len(payloads)]
            info = tarfile.TarInfo(f"{n:06d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _by_name(path: str, name: str) -> bytes:
    with tarfile.open(path) as archive:
        return archive.extractfile(name).read()


def measure(path: Path, searched: int) -> dict:
    """Listing, then every record read as an actor reads them (run shard by run shard), then `searched` members
    from the middle of the shard found by name."""
    from pipeline import reading
    from pipeline.datasets.layouts import webdataset

    start = time.perf_counter()
    records = webdataset(path).records
    listed = time.perf_counter() - start
    reading._streams.clear()
    start = time.perf_counter()
    for first in range(0, len(records), RUN_SHARD):
        chunk = records[first:first + RUN_SHARD]
        reading.expect(str(path), [r.member for r in chunk])
        for record in chunk:
            reading.read_bytes(record.path, record.member)
    read = time.perf_counter() - start
    passes = reading._streams[str(path)].opened if str(path) in reading._streams else 0
    reading._streams.clear()
    middle = records[len(records) // 2:len(records) // 2 + searched]
    start = time.perf_counter()
    for record in middle:
        _by_name(record.path, record.member.name)
    search = (time.perf_counter() - start) / max(1, len(middle))
    return {"members": len(records), "list_ms_per_member": 1e3 * listed / len(records),
            "read_ms_per_image": 1e3 * read / len(records), "decompression_passes": passes,
            "search_by_name_ms_per_image": 1e3 * search, "searched": len(middle)}


def tar_reading(scratch: Path, sizes: tuple[int, ...] = (500, 5000), searched: int = 10) -> list[dict]:
    """One row per shard size and kind."""
    payloads = _payloads()
    rows = []
    for members in sizes:
        for suffix in KINDS:
            path = scratch / f"shard-{members}{suffix}"
            make_shard(path, members, payloads)
            row = measure(path, searched if suffix == ".tar" or members <= 1000 else max(1, searched // 5))
            rows.append({"kind": suffix, "shard_mb": path.stat().st_size / 1e6, **row})
            path.unlink()
    return rows


def print_table(rows: list[dict]) -> None:
    print("  WebDataset reading, bytes only (ms per image):")
    print("    members  kind     shard MB  listing   read  passes  search by name (before)")
    for row in rows:
        print(f"    {row['members']:>7d}  {row['kind']:<7s} {row['shard_mb']:>8.1f} {row['list_ms_per_member']:>8.3f} "
              f"{row['read_ms_per_image']:>6.3f} {row['decompression_passes']:>7d}  "
              f"{row['search_by_name_ms_per_image']:>8.1f} ({row['searched']} members)")
