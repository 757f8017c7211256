"""Issue 19 (8, 9, 11, 14): WebDataset shards. Links inside a shard are read through, duplicates and odd members
are failure rows (never silently dropped); tar members are carried as (shard, member), never parsed from a path
string; a per-image byte limit is checked before anything is read; a member is read by its offset from the listing
(a compressed shard in one forward pass), never by searching the shard."""
from __future__ import annotations

import io
import random
import shutil
import subprocess
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import reading
from pipeline.config import ConfigError, load_config
from pipeline.datasets import detect_layout, load_records
from pipeline.datasets.layouts import webdataset
from pipeline.preprocess import DecodeError, decode, load, read_bytes

from .bad_inputs import reference_rgb

SUFFIXES = {"w": ".tar", "w:gz": ".tar.gz"}


def _jpeg(value: int, side: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), value, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, payload: bytes | None = None, **fields) -> None:
    info = tarfile.TarInfo(name)
    for key, value in fields.items():
        setattr(info, key, value)
    if payload is None:
        archive.addfile(info)
    else:
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))


def _odd_shard(path: Path, mode: str = "w") -> Path:
    """Every kind of member that looks like an image: regular, links inside and outside, duplicates, others."""
    with tarfile.open(path, mode) as archive:
        _add(archive, "a.jpg", _jpeg(10))
        _add(archive, "a.cls", b"3")
        _add(archive, "b.jpg", type=tarfile.LNKTYPE, linkname="a.jpg")  # cp -al, rsync --link-dest, dedup tools
        _add(archive, "b.cls", b"4")
        _add(archive, "c.jpg", type=tarfile.SYMTYPE, linkname="a.jpg")
        _add(archive, "sub/d.jpg", type=tarfile.SYMTYPE, linkname="../a.jpg")
        _add(archive, "e.jpg", type=tarfile.SYMTYPE, linkname="../../etc/passwd")
        _add(archive, "f.jpg", type=tarfile.SYMTYPE, linkname="/etc/hostname")
        _add(archive, "g.jpg", type=tarfile.SYMTYPE, linkname="nowhere.jpg")
        _add(archive, "h.jpg", type=tarfile.DIRTYPE)
        _add(archive, "i.jpg", type=tarfile.CHRTYPE)
        _add(archive, "j.jpg", type=tarfile.FIFOTYPE)
        _add(archive, "k.jpg", _jpeg(50))
        _add(archive, "k.jpg", _jpeg(200))  # appended later (tar -r / tar -u): the one tar -x leaves
    return path


ODD_PROBLEMS = {
    "e": "link outside the shard: e.jpg -> ../../etc/passwd",
    "f": "link outside the shard: f.jpg -> /etc/hostname",
    "g": "link to no member of the shard: g.jpg -> nowhere.jpg",
    "h": "not a file (a directory)",
    "i": "not a file (a device)",
    "j": "not a file (a FIFO)",
    "k#1": "duplicate member name: replaced by a later member of the same name (as tar -x leaves it)",
}


@pytest.mark.parametrize("mode", SUFFIXES)
def test_links_inside_a_shard_are_read_through_and_every_other_member_is_a_failure(tmp_path, mode):
    shard = _odd_shard(tmp_path / f"shard{SUFFIXES[mode]}", mode)
    records = {r.image_id: r for r in load_records(shard)}
    assert set(records) == {"a", "b", "c", "d", *ODD_PROBLEMS, "k"}
    assert {i: r.problem for i, r in records.items() if r.problem} == ODD_PROBLEMS
    assert (records["a"].label, records["b"].label) == (3, 4)  # the hard link is a sample of its own
    original = load(records["a"])[0]
    for link in "bcd":
        assert records[link].member.name.endswith(f"{link}.jpg")
        assert np.array_equal(load(records[link])[0], original), link
    assert np.asarray(decode(read_bytes(records["k"].path, records["k"].member))).mean() > 150  # the later one
    assert records["k#1"].member.name == "k.jpg"  # its failure row names the member


def test_paths_containing_double_colons_are_files_not_tar_members(tmp_path):
    folder = tmp_path / "runs::2024"
    folder.mkdir()
    Image.fromarray(reference_rgb(0)).save(folder / "x::y.jpg")
    (record,) = load_records(folder, "plain")
    assert record.member is None and record.path == str(folder / "x::y.jpg")
    assert load(record)[0].shape == (3, 224, 224)
    shards = tmp_path / "wds::v2"
    shards.mkdir()
    with tarfile.open(shards / "s::0.tar", "w") as archive:
        _add(archive, "p::q.jpg", _jpeg(90))
    (member,) = load_records(shards)
    assert (member.path, member.member.name) == (str(shards / "s::0.tar"), "p::q.jpg")
    assert load(member)[0].shape == (3, 224, 224)


def test_an_image_over_the_byte_limit_is_refused_before_it_is_read(tmp_path):
    data = _jpeg(10)
    (tmp_path / "big.jpg").write_bytes(data)
    with tarfile.open(tmp_path / "shard.tar", "w") as archive:
        _add(archive, "big.jpg", data)
    (record,) = load_records(tmp_path / "shard.tar")
    limit = len(data) - 1
    for path, member in ((str(tmp_path / "big.jpg"), None), (record.path, record.member)):
        with pytest.raises(DecodeError, match=rf"^file too large \({len(data)} bytes > limit {limit}\)$"):
            read_bytes(path, member, limit)
        assert read_bytes(path, member, len(data)) == data


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write a sparse member")
def test_a_sparse_two_gib_member_of_a_small_shard_costs_nothing(tmp_path):
    """The issue's case: a 10 KB shard whose sparse member expands to 2 GiB made a worker allocate 5.5 GB."""
    sparse = tmp_path / "in" / "big.jpg"
    sparse.parent.mkdir()
    with open(sparse, "wb") as handle:
        handle.truncate(2 * 1024**3)
    result = subprocess.run(["tar", "--sparse", "-cf", str(tmp_path / "shard.tar"), "-C", str(sparse.parent),
                             "big.jpg"], capture_output=True, text=True, timeout=60, check=False)
    sparse.unlink()
    if result.returncode != 0:
        pytest.skip(f"tar --sparse: {result.stderr.strip()}")
    assert (tmp_path / "shard.tar").stat().st_size < 64 * 1024
    (record,) = load_records(tmp_path / "shard.tar")
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match=r"^file too large \(2147483648 bytes > limit 268435456\)$"):
            load(record)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024**2


@pytest.mark.parametrize("value", [0, -1, "big", True])
def test_the_byte_limit_setting_is_checked(value):
    with pytest.raises(ConfigError, match="max_image_bytes.*must be a positive integer"):
        load_config({"max_image_bytes": value})
    assert load_config().max_image_bytes == 256 * 1024**2


def _members_shard(path: Path, count: int, mode: str) -> dict[str, bytes]:
    payloads = {f"{n:05d}.jpg": n.to_bytes(4, "big") * (50 + n % 7) for n in range(count)}
    with tarfile.open(path, mode) as archive:
        for name, payload in payloads.items():
            _add(archive, name, payload)
    return payloads


def test_a_plain_tar_member_is_read_at_its_offset_without_opening_the_archive(tmp_path, monkeypatch):
    payloads = _members_shard(tmp_path / "shard.tar", 20, "w")
    records = load_records(tmp_path / "shard.tar")

    def refused(*args, **kwargs):
        raise AssertionError("the shard was opened as an archive (a search by name)")

    monkeypatch.setattr(tarfile, "open", refused)
    assert {r.member.name: read_bytes(r.path, r.member) for r in records} == payloads


@pytest.mark.parametrize("mode", SUFFIXES)
def test_a_shard_changed_since_its_listing_is_a_failure_not_another_image(tmp_path, mode):
    path = tmp_path / f"shard{SUFFIXES[mode]}"
    _members_shard(path, 3, mode)
    records = load_records(path)
    with tarfile.open(path, mode) as archive:
        _add(archive, "other.jpg", b"x" * 3000)  # rewritten in place: offsets now point elsewhere
    reading._streams.clear()
    with pytest.raises(DecodeError, match="shard changed since it was listed|unreadable shard"):
        read_bytes(records[1].path, records[1].member)


def test_a_compressed_shard_is_decompressed_once_for_reads_out_of_order(tmp_path):
    """Decode threads ask for members out of order: the members the run shard expects are kept as the stream
    passes them, so one forward pass serves them all (and the next run shard continues that pass)."""
    path = tmp_path / "shard.tar.gz"
    payloads = _members_shard(path, 60, "w:gz")
    records = load_records(path)
    reading._streams.clear()
    for start in (0, 30):  # two run shards of 30 records, in one actor
        chunk = records[start:start + 30]
        reading.expect(chunk[0].path, [r.member for r in chunk])
        shuffled = random.Random(start).sample(chunk, len(chunk))
        assert {r.member.name: read_bytes(r.path, r.member) for r in shuffled} == \
            {r.member.name: payloads[r.member.name] for r in chunk}
    assert read_bytes(records[3].path, records[3].member) == payloads[records[3].member.name]  # read again
    assert reading.stream(str(path), "gz").opened == 1
    assert reading.stream(str(path), "gz").kept == {}


def test_a_folder_of_compressed_shards_is_a_webdataset(tmp_path):
    for name in ("a.tar.gz", "b.tgz"):
        with tarfile.open(tmp_path / name, "w:gz") as archive:
            _add(archive, f"{name[0]}.jpg", _jpeg(20))
    assert detect_layout(tmp_path) == "webdataset"
    assert [r.image_id for r in webdataset(tmp_path).records] == ["a", "b"]


@pytest.mark.timeout(600)
def test_explain_a_shard_with_odd_members_lists_every_one(tmp_path, artifact_cache, local_ray, capsys):
    """End to end (Ray, the CLI): every member that looks like an image is explained or a failure row."""
    pytest.importorskip("ray")
    from .test_output_safety import SIZE, _args, _cli

    root = tmp_path / "shards"
    root.mkdir()
    _odd_shard(root / "shard-000000.tar.gz", "w:gz")
    out = tmp_path / "run"
    assert _cli(_args(root, out, artifact_cache)) == 1, capsys.readouterr().err  # 1: some images failed
    stats = pq.read_table(out / "stats").to_pandas()
    failures = pq.read_table(out / "failures.parquet").to_pandas()
    assert sorted(stats["image_id"]) == ["a", "b", "c", "d", "k"]
    assert dict(zip(failures["image_id"], failures["reason"])) == ODD_PROBLEMS
    assert set(stats["path"]) == set(failures["path"]) == {str(root / "shard-000000.tar.gz")}
    assert dict(zip(stats["image_id"], stats["member"]))["d"] == "sub/d.jpg"
    assert dict(zip(failures["image_id"], failures["member"]))["k#1"] == "k.jpg"
    from pipeline.report.tiles import display_crop, members, preprocessing_for  # the report reads (path, member)

    crops = [display_crop(path, preprocessing_for(SIZE), member) for path, member in zip(stats["path"], members(stats))]
    assert all(crop.shape == (SIZE, SIZE, 3) for crop in crops)


@pytest.mark.parametrize("mode", SUFFIXES)
def test_the_device_decoder_path_reads_tar_members_with_the_byte_limit(tmp_path, mode):
    """pipeline/gpu_decode.py (run here on the CPU) reads members as the Pillow path does, limit included."""
    from pipeline.gpu_decode import DeviceDecoder
    from pipeline.preprocess import Preprocessing

    prep = Preprocessing.for_size(32)
    with tarfile.open(tmp_path / f"s{SUFFIXES[mode]}", mode) as archive:
        for n in range(6):
            _add(archive, f"{n}.jpg", _jpeg(20 * n, side=40 + 8 * n))
    records = load_records(tmp_path / f"s{SUFFIXES[mode]}")
    limit = sorted(r.member.size for r in records)[3]  # the two biggest are over it
    reading._streams.clear()

    def pillow(at, record):
        try:
            return load(record, prep, limit)
        except DecodeError as error:
            return error

    decoder = DeviceDecoder(prep, "cpu", batch_size=4, threads=2, max_bytes=limit)
    try:
        got = list(decoder.iterate(records, pillow))
    finally:
        decoder.close()
    too_large = [str(item) for item in got if isinstance(item, Exception)]
    assert len(too_large) == 2 and all(reason.startswith("file too large") for reason in too_large)
    for record, item in zip(records, got):
        if not isinstance(item, Exception):
            assert np.array_equal(item[0], load(record, prep)[0]), record.image_id


def test_virelay_dataset_crops_tar_members_from_the_member_column(tmp_path):
    """SpRAy's ViRelAy dataset.h5 decodes each image again: a tar member from (path, member), not black."""
    import h5py
    import pandas as pd

    from pipeline.run_manifest import Manifest
    from pipeline.spray.inputs import RunIndex
    from pipeline.spray.virelay import write_dataset

    with tarfile.open(tmp_path / "s.tar", "w") as archive:
        _add(archive, "a.jpg", _jpeg(200))
    (record,) = load_records(tmp_path / "s.tar")
    table = pd.DataFrame({"path": [record.path], "member": [record.member.name], "label": [3]})
    index = RunIndex(tmp_path, Manifest(tmp_path / "manifest.json", False), table, ["c"] * 10, ["w"] * 10, size=32)
    assert write_dataset(tmp_path / "dataset.h5", index, threads=1) == 0  # none unreadable
    with h5py.File(tmp_path / "dataset.h5") as handle:
        assert handle["data"][0].mean() > 150
