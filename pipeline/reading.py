"""Read one image's bytes: a file, or a WebDataset member at the offset its listing found, with the per-image
byte limit checked before anything is read (file size, tar header size), so that a small shard holding a sparse
2 GiB member, or a huge file, costs nothing but its failure row.

A plain .tar member is one seek and one read (the header before it checked, so a shard changed since its listing
is a failure, never another image's bytes). A compressed shard (.tar.gz, ...) cannot be seeked: each process keeps
one decompressing stream per shard that moves forward only; `expect` names the members a run shard will read, so
that members passed on the way to another (decode threads ask out of order) are kept until asked for. Records come
in shard order, so an actor decompresses each shard about once, whatever its size.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterable

from .datasets.records import TarMember

DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024  # configs/run.yaml max_image_bytes
BLOCK = tarfile.BLOCKSIZE  # a member's header is the 512-byte block before its data
OPENERS = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}
RECENT_BYTES = 64 * 1024 * 1024  # members of a compressed shard kept after their read (a second read: no rewind)


class DecodeError(ValueError):
    """An image cannot be read; the message is the reason recorded in failures.parquet."""


def too_large(size: int, max_bytes: int) -> DecodeError:
    return DecodeError(f"file too large ({size} bytes > limit {max_bytes})")


def read_file(path: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """A file's bytes; refused unread when its size is over `max_bytes` (and never more than that is read)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise too_large(size, max_bytes)
            data = handle.read(max_bytes + 1)  # a file growing (or a device) is still bounded
    except PermissionError:
        raise DecodeError("permission denied") from None
    except FileNotFoundError:
        raise DecodeError("missing file (deleted, or a dangling link)") from None
    except IsADirectoryError:
        raise DecodeError("not a file (a directory)") from None
    except OSError as error:
        raise DecodeError(f"unreadable: {type(error).__name__}: {error}") from None
    if len(data) > max_bytes:
        raise too_large(len(data), max_bytes)
    return data


def _checked(block: bytes, member: TarMember) -> bytes:
    """The member's data from its header block + data, after checking the header still describes it."""
    try:
        header = tarfile.TarInfo.frombuf(block[:BLOCK], "utf-8", "surrogateescape")
    except tarfile.TarError:
        header = None
    if header is None or len(block) != BLOCK + member.size or (header.size != member.size and not member.sparse):
        raise DecodeError(f"shard changed since it was listed: no member data at offset {member.offset}")
    return block[BLOCK:]


class _Stream:
    """A compressed shard read forward only, keeping the expected members it passes until they are asked for."""

    def __init__(self, path: str, kind: str) -> None:
        self.path, self.kind = path, kind
        self.lock = threading.Lock()
        self.handle = None
        self.expected: set[tuple[int, int]] = set()
        self.kept: dict[tuple[int, int], bytes] = {}
        self.recent: OrderedDict[tuple[int, int], bytes] = OrderedDict()  # the GPU path's CPU fallback, a probe
        self.recent_bytes = 0
        self.opened = 0  # decompression passes begun (benchmarks, tests)

    def expect(self, members: Iterable[TarMember]) -> None:
        with self.lock:
            self.expected = {(m.offset, m.size) for m in members}
            self.kept = {k: v for k, v in self.kept.items() if k in self.expected}

    def read(self, member: TarMember) -> bytes:
        key = (member.offset, member.size)
        with self.lock:
            if key in self.kept:
                return self._remember(key, self.kept.pop(key))
            if key in self.recent:
                return self.recent[key]
            if self.handle is None or self.handle.tell() > member.offset - BLOCK:
                self._reopen()
            for offset, size in sorted(k for k in self.expected - self.kept.keys()
                                       if self.handle.tell() <= k[0] - BLOCK < member.offset - BLOCK):
                self.kept[(offset, size)] = self._at(offset, size)
            return self._remember(key, self._at(member.offset, member.size))

    def _remember(self, key: tuple[int, int], data: bytes) -> bytes:
        self.recent[key] = data
        self.recent_bytes += len(data)
        while self.recent_bytes > RECENT_BYTES and len(self.recent) > 1:
            self.recent_bytes -= len(self.recent.popitem(last=False)[1])
        return data

    def _at(self, offset: int, size: int) -> bytes:
        self.handle.seek(offset - BLOCK)  # forward: decompresses what lies between
        return self.handle.read(BLOCK + size)

    def _reopen(self) -> None:
        if self.handle is not None:
            self.handle.close()
        self.handle = OPENERS[self.kind](self.path, "rb")
        self.opened += 1

    def close(self) -> None:
        with self.lock:
            if self.handle is not None:
                self.handle.close()
            self.handle, self.kept, self.recent, self.recent_bytes = None, {}, OrderedDict(), 0


_streams: dict[str, _Stream] = {}
_streams_lock = threading.Lock()


def stream(path: str, kind: str) -> _Stream:
    """This process's forward-only stream of a compressed shard (one per shard path)."""
    with _streams_lock:
        if path not in _streams:
            _streams[path] = _Stream(path, kind)
        return _streams[path]


def expect(path: str, members: Iterable[TarMember], max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> None:
    """Tell the stream of compressed shard `path` which of its members the next reads will ask for (those over the
    byte limit are never read)."""
    members = [m for m in members if m.compression and m.size <= max_bytes and not m.sparse]
    if members:
        stream(path, members[0].compression).expect(members)


def read_member(path: str, member: TarMember, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """A shard member's data, from the offset and size of the listing: size limit first, then one seek."""
    if member.size > max_bytes:
        raise too_large(member.size, max_bytes)
    if member.sparse:
        raise DecodeError("sparse tar member (a GNU sparse file is not an image)")
    if member.offset < BLOCK:
        raise DecodeError(f"shard changed since it was listed: no member data at offset {member.offset}")
    try:
        if member.compression:
            return _checked(stream(path, member.compression).read(member), member)
        with open(path, "rb") as handle:
            handle.seek(member.offset - BLOCK)
            return _checked(handle.read(BLOCK + member.size), member)
    except PermissionError:
        raise DecodeError("permission denied") from None
    except FileNotFoundError:
        raise DecodeError("missing shard (deleted since it was listed)") from None
    except (OSError, EOFError, tarfile.TarError, lzma.LZMAError) as error:
        raise DecodeError(f"unreadable shard: {type(error).__name__}: {error}") from None


def read_named_member(path: str, name: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """A member found by name (the readers of a finished run, which know the `member` column only): the last member
    of that name, links inside the shard read through, as the listing did."""
    from .datasets.tar_shards import list_shard

    try:
        entries = [e for e in list_shard(path, lambda member: member == name) if not e.duplicate]
    except (OSError, EOFError, tarfile.TarError) as error:
        raise DecodeError(f"unreadable shard: {type(error).__name__}: {error}") from None
    if not entries:
        raise DecodeError(f"missing member {name} in {path}")
    if entries[-1].member is None:
        raise DecodeError(entries[-1].problem or "unreadable member")
    return read_member(path, entries[-1].member, max_bytes)


def read_bytes(path: str, member: TarMember | str | None = None, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """An image's bytes: the file `path`, or its member (from the listing, or by name) when `path` is a shard."""
    if member is None:
        return read_file(path, max_bytes)
    if isinstance(member, str):
        return read_named_member(path, member, max_bytes)
    return read_member(path, member, max_bytes)
