"""List one WebDataset tar shard: every member that looks like an image or a label, each with where its data lies
(`TarMember`: offset and size, so that a worker seeks to it instead of searching the shard) or why it cannot be
read. Nothing is dropped silently:

- a hard link (what `cp -al`, rsync --link-dest and dedup tools produce) or a symbolic link to another member of
  the same shard is read through: its record points at the target's data;
- a link leading outside the shard (absolute, `..` above its top, or to no member), a directory, device or FIFO
  with an image's name: the member is listed with the reason (a failure row);
- two members with the same name: the last one is the member (as `tar -x` and `tar -u` leave it); each earlier
  one is listed as a duplicate, a failure row of its own (its id gets `#1`, `#2`, ... in the order of the shard).
"""
from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

from .records import TarMember

MAGIC = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}  # tarfile's own compressions
SMALL = 256  # bytes of a label member read while listing (a class index is a few)
LINK_HOPS = 8  # symbolic links followed inside a shard before calling it a loop
DUPLICATE = "duplicate member name: replaced by a later member of the same name (as tar -x leaves it)"


@dataclass(frozen=True)
class Entry:
    """One member of a shard as the dataset sees it: readable (`member`) or not (`problem`)."""

    name: str
    position: int  # order in the shard
    member: TarMember | None
    problem: str | None = None
    duplicate: int = 0  # 0: the member of its name; n >= 1: the n-th earlier member of the same name
    small: bytes | None = None  # the data when at most SMALL bytes (labels are read at listing time)


def compression(path: str) -> str | None:
    """The shard's compression from its first bytes (as tarfile detects it), None for a plain .tar."""
    with open(path, "rb") as handle:
        head = handle.read(6)
    return next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)


def _key(name: str) -> str:
    return posixpath.normpath(name.lstrip("/")) if name else name


def _kind(info: tarfile.TarInfo) -> str:
    if info.isdir():
        return "a directory"
    if info.ischr() or info.isblk():
        return "a device"
    if info.isfifo():
        return "a FIFO"
    return f"tar member type {info.type!r}"


class _Resolver:
    """Where each member's data lies, following links inside the shard."""

    def __init__(self, members: list[tarfile.TarInfo]) -> None:
        self.members = members
        self.last: dict[str, int] = {}  # normalised name -> position of its last member
        self.hard: dict[int, int] = {}  # a hard link's position -> the last earlier member of the name it links
        for position, info in enumerate(members):
            if info.islnk() and _key(info.linkname) in self.last:
                self.hard[position] = self.last[_key(info.linkname)]
            self.last[_key(info.name)] = position

    def resolve(self, position: int) -> tuple[int | None, str | None]:
        """The position of the regular member whose data `members[position]` reads, or why there is none."""
        info = self.members[position]
        for _ in range(LINK_HOPS):
            if info.isreg():
                return position, None
            if info.islnk():  # a hard link names an earlier member, by its name in the archive
                target = self.hard.get(position)
                if target is None:
                    return None, f"hard link to no earlier member of the shard: {info.linkname}"
                position, info = target, self.members[target]
                continue
            if info.issym():
                name = info.linkname
                joined = posixpath.normpath(posixpath.join(posixpath.dirname(_key(info.name)), name))
                if posixpath.isabs(name) or joined == ".." or joined.startswith("../"):
                    return None, f"link outside the shard: {info.name} -> {name}"
                if joined not in self.last:
                    return None, f"link to no member of the shard: {info.name} -> {name}"
                position = self.last[joined]
                info = self.members[position]
                continue
            return None, f"not a file ({_kind(info)})"
        return None, f"link loop in the shard: {self.members[position].name}"


def list_shard(path: str, wanted: Callable[[str], bool]) -> list[Entry]:
    """Entries of the members whose names `wanted` accepts, in shard order, from one sequential pass over the shard
    (a .tar.gz is decompressed once). Raises tarfile.TarError, OSError."""
    kind = compression(path)
    members: list[tarfile.TarInfo] = []
    small: dict[int, bytes] = {}
    with tarfile.open(path) as archive:
        for info in archive:  # each small member read while the stream is at it: no seek back
            if info.isreg() and info.size <= SMALL and not info.issparse():
                small[len(members)] = archive.extractfile(info).read()
            members.append(info)
    resolver = _Resolver(members)
    seen: dict[str, int] = {}
    entries = []
    for position, info in enumerate(members):
        if not wanted(info.name):
            continue
        key = _key(info.name)
        if resolver.last[key] != position:
            seen[key] = seen.get(key, 0) + 1
            entries.append(Entry(info.name, position, None, DUPLICATE, seen[key]))
            continue
        at, problem = resolver.resolve(position)
        if at is None:
            entries.append(Entry(info.name, position, None, problem))
            continue
        target = members[at]
        member = TarMember(info.name, target.offset_data, target.size, kind, target.issparse())
        entries.append(Entry(info.name, position, member, None, 0, small.get(at)))
    return entries
