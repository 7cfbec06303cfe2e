"""Webdataset shards as plain tar files: reading them sample by sample, and writing them.

A shard is a tar whose members sharing a key (the name up to the basename's first dot) form one sample:
{"__key__", "__url__", ext: bytes, ...}; a local shard may hold a sample's files apart, a streamed one not.
Every shard vaemo writes (synthetic worlds, packed user clips, teacher caches) goes through `ShardWriter`,
so all share one layout: ustar, mtime 0 (the bytes are a function of the content), and written under a
temporary name so that a half-written shard never has the final one.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import re
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


@dataclass
class ShardError:
    """A shard (or part of one) that could not be read; counted as `unreadable_shard`."""

    url: str
    detail: str


_BLOCK = 512
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: the key ends at the basename's first dot


def _read_exact(stream, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Member(NamedTuple):
    name: str
    start: int  # where its bytes begin in the archive (when read with skip_data)
    size: int
    data: bytes | None  # None when read with skip_data


def tar_members(stream, skip_data: bool = False) -> Iterator[Member]:
    """The regular files of a ustar/pax/GNU tar stream, in archive order; with `skip_data` (a seekable
    stream) their bytes are seeked over, for `in_key_order` to read later.

    Python's tarfile does much more than a shard needs (0.1 ms a member); this reads the 512-byte
    headers directly. A damaged or cut-off archive raises ValueError.
    """
    long_name: str | None = None
    while True:
        header = _read_exact(stream, _BLOCK)
        if len(header) < _BLOCK or header.count(0) == _BLOCK:
            if 0 < len(header) < _BLOCK:
                raise ValueError("the archive ends inside a header")
            return
        stored = int(header[148:156].replace(b"\0", b" ").strip() or b"0", 8)
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise ValueError("bad tar header checksum")
        size_field = header[124:136]
        size = (
            int.from_bytes(size_field[1:], "big")
            if size_field[0] & 0x80
            else int(size_field.replace(b"\0", b" ").strip() or b"0", 8)
        )
        kind = header[156:157]
        regular = kind in (b"0", b"\0", b"7")
        start = stream.tell() if skip_data else 0
        data = None
        if skip_data and regular:
            stream.seek(size + (-size % _BLOCK), os.SEEK_CUR)  # past the end of a cut archive: found on reading
        else:
            data = _read_exact(stream, size)
            if len(data) < size:
                raise ValueError("the archive ends inside a member")
            _read_exact(stream, -size % _BLOCK)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        if kind == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == b"x":  # pax extended header: "LEN path=NAME\n" records
            for record in data.decode("utf-8", "replace").split("\n"):
                key, _, value = record.partition(" ")[2].partition("=")
                if key == "path":
                    long_name = value
        elif regular:
            yield Member(long_name or name, start, size, data)
            long_name = None
        else:  # directories, links: nothing to read
            long_name = None


def key_and_extension(name: str) -> tuple[str, str] | None:
    """A member's sample key and extension; None for a name no sample has (no extension, or webdataset's
    own top-level `__x__` files)."""
    match = _KEY.match(name)
    if match is None or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None
    return match.group(1), match.group(2).lower()


def sample_key(name: str) -> str:
    """The key a member belongs to (a name no sample has stands for itself)."""
    return (key_and_extension(name) or (name,))[0]


class LazyBytes(NamedTuple):
    """A member's bytes, read from its local shard only when a consumer asks (`materialized`): a resumed
    stream passes over the samples it had drawn before without reading them."""

    path: str
    start: int
    size: int
    shard: tuple[int, ...]  # the file the offsets are of (`file_identity`): a shard packed again has others

    def read(self) -> bytes:
        with open(self.path, "rb") as stream:
            if file_identity(stream) != self.shard:
                raise ValueError("the shard was written again since its headers were read")
            stream.seek(self.start)
            data = _read_exact(stream, self.size)
        if len(data) < self.size:
            raise ValueError("the archive ends inside a member")
        return data


def file_identity(stream) -> tuple[int, ...]:
    info = os.fstat(stream.fileno())
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def materialized(sample: dict) -> dict:
    """The sample with every LazyBytes value read; as it is when it holds none."""
    if not any(isinstance(value, LazyBytes) for value in sample.values()):
        return sample
    return {name: value.read() if isinstance(value, LazyBytes) else value for name, value in sample.items()}


def in_key_order(stream, lazy_path: str | None = None) -> tuple[Iterator[tuple[str, bytes | LazyBytes]], ValueError | None]:
    """The (name, bytes) of a seekable tar's files with each sample's files together, samples in the order
    they first appear: the contract makes a sample of the files that share a key, wherever the tar holds
    them (`tar cf` of a folder interleaves them); a shard whose samples are already together reads in
    order. And the damage found in the archive (None: whole), for the caller to raise once every sample
    before it has been read: those are whole, unlike a sequential read's last one. With `lazy_path` (the
    archive's file) the bytes are LazyBytes, read when asked for."""
    end = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    members: list[Member] = []
    damage = None
    try:
        for member in tar_members(stream, skip_data=True):
            members.append(member)
            if member.start + member.size > end:
                raise ValueError("the archive ends inside a member")
    except ValueError as err:
        damage = err
    keys = [sample_key(m.name) for m in members]
    if damage is not None and members:
        # The samples before the damage are read; the one it came in may be incomplete and is left out,
        # as a sequential read leaves it out.
        whole = [i for i, key in enumerate(keys) if key != keys[-1]]
        members, keys = [members[i] for i in whole], [keys[i] for i in whole]
    first_seen: dict[str, int] = {}
    for position, key in enumerate(keys):
        first_seen.setdefault(key, position)
    order = sorted(range(len(members)), key=lambda i: first_seen[keys[i]])  # stable: a sample's files keep their order
    ordered = [members[i] for i in order]
    if lazy_path is not None:
        shard = file_identity(stream)
        return ((m.name, LazyBytes(lazy_path, m.start, m.size, shard)) for m in ordered), damage
    return _read_members(stream, ordered), damage


def _read_members(stream, members: list[Member]) -> Iterator[tuple[str, bytes]]:
    for member in members:
        stream.seek(member.start)
        data = _read_exact(stream, member.size)
        if len(data) < member.size:  # the file shrank since the headers were read
            raise ValueError("the archive ends inside a member")
        yield member.name, data


def group_samples(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict]:
    """Consecutive files sharing a key become one sample {"__key__", "__url__", ext: bytes, ...}. A key that
    comes back after another sample's files (a streamed shard cannot be regrouped) is marked
    `__scattered__`: what came first was already a sample."""
    sample: dict | None = None
    finished: set[str] = set()
    for name, data in members:
        parts = key_and_extension(name)
        if parts is None:
            continue
        key, ext = parts
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                finished.add(sample["__key__"])
                yield sample
            sample = {"__key__": key, "__url__": url}
            if key in finished:
                sample["__scattered__"] = True
        if ext in sample:
            sample["__duplicate__"] = ext
        sample[ext] = data
    if sample is not None:
        yield sample


class _Rewound:
    """A stream whose first bytes were read (to tell a gzip'ed tar from a plain one), given back first."""

    def __init__(self, stream, head: bytes):
        self.stream, self.head = stream, head

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]
        return data + self.stream.read(n - len(data)) if len(data) < n else data


def _seekable(stream) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):  # webdataset's pipes have no seekable()
        return False


def _tar_stream(stream) -> tuple[object, bool]:
    """The stream to read members from, and whether they can be read out of order: a local tar can; a
    gzip'ed one (decompressed as it is read) and a pipe or URL cannot."""
    head = stream.read(2)
    gzipped = head == b"\x1f\x8b"
    if _seekable(stream):
        stream.seek(0)
    else:
        stream = _Rewound(stream, head)
    if gzipped:
        return gzip.GzipFile(fileobj=stream, mode="rb"), False
    return stream, _seekable(stream)


def read_shard(url: str, retry_delays: tuple[float, ...] = (), lazy: bool = False) -> Iterator[dict | ShardError]:
    """Raw samples (dicts of bytes keyed by extension) of one shard; a read error ends the shard as a ShardError.
    `retry_delays`: seconds to wait before each new try of a shard that failed with an I/O error before its
    first sample (shared storage that dropped out for a moment); a missing or forbidden file is not retried.
    `lazy`: a local uncompressed shard's bytes come as LazyBytes (its headers are read, its files not)."""
    for delay in (*retry_delays, None):
        yielded = False
        try:
            from webdataset import gopen

            with gopen(url, "rb") as opened:
                stream, random_access = _tar_stream(opened)
                if random_access:
                    lazy_path = url if lazy and os.path.isfile(url) else None
                    members, damage = in_key_order(stream, lazy_path)
                else:
                    members, damage = ((m.name, m.data) for m in tar_members(stream)), None
                for sample in group_samples(members, url):
                    yielded = True
                    yield sample
                if damage is not None:
                    raise damage
            return
        except Exception as exn:  # unreadable, truncated or not a tar: counted, never fatal
            if delay is not None and not yielded and transient(exn):
                time.sleep(delay)
                continue
            yield ShardError(url, f"{type(exn).__name__}: {str(exn).splitlines()[0][:120] if str(exn) else ''}")
            return


def transient(error: BaseException) -> bool:
    """An I/O error of shared storage that another try may not meet (EIO, a stale NFS handle, a timeout, a
    dropped connection), unlike a missing or forbidden file or a damaged archive. A `pipe:` command that
    failed carries no errno (its exit status alone): an object that does not exist fails the same way
    again, and curl already retries a URL itself."""
    return isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS


TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.ESTALE,
    errno.ETIMEDOUT,
    errno.EAGAIN,
    errno.EBUSY,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ENOTCONN,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.EHOSTDOWN,
    errno.EHOSTUNREACH,
}


def count_samples(path: str) -> int | None:
    """How many samples (distinct keys) a local, uncompressed tar holds, from its headers alone; None for
    anything else (a URL, a pipe, a gzip'ed or damaged tar), which a caller then cannot count cheaply."""
    try:
        with open(path, "rb") as stream:
            if stream.read(2) == b"\x1f\x8b":
                return None
            stream.seek(0)
            members = list(tar_members(stream, skip_data=True))
            if members and members[-1].start + members[-1].size > os.fstat(stream.fileno()).st_size:
                return None  # cut short: its headers promise more than the file holds
            return len({sample_key(member.name) for member in members})
    except (OSError, ValueError):
        return None


class ShardWriter:
    """`with ShardWriter(path) as shard: shard.write(key, {"mp4": ..., "json": ...})`; the file appears at
    `path` only when the block ends without an error."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._partial = self.path.with_name(f"{self.path.name}.partial-{os.getpid()}")
        self._tar: tarfile.TarFile | None = None
        self.samples = 0

    def __enter__(self) -> ShardWriter:
        self._tar = tarfile.open(self._partial, "w", format=tarfile.USTAR_FORMAT)
        return self

    def write(self, key: str, files: dict[str, bytes]) -> None:
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def __exit__(self, kind, value, traceback) -> None:
        self._tar.close()
        if kind is None:
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink(missing_ok=True)
