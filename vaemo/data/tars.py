"""Webdataset shards as plain tar files: reading them sample by sample, and writing them.

A shard is a tar whose consecutive members sharing a key (the name up to the basename's first dot) form one
sample: {"__key__", "__url__", ext: bytes, ...}. Every shard vaemo writes (synthetic worlds, packed user
clips, teacher caches) goes through `ShardWriter`, so all share one layout: ustar, mtime 0 (the bytes are a
function of the content), and written under a temporary name so that a half-written shard never has the
final one.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


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


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a ustar/pax/GNU tar stream, read sequentially.

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
        data = _read_exact(stream, size)
        if len(data) < size:
            raise ValueError("the archive ends inside a member")
        _read_exact(stream, -size % _BLOCK)
        kind = header[156:157]
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
        elif kind in (b"0", b"\0", b"7"):
            yield long_name or name, data
            long_name = None
        else:  # directories, links: nothing to read
            long_name = None


def group_samples(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict]:
    """Consecutive files sharing a key become one sample {"__key__", "__url__", ext: bytes, ...}."""
    sample: dict | None = None
    for name, data in members:
        match = _KEY.match(name)
        if match is None or os.path.basename(name).startswith("__"):
            continue
        key, ext = match.group(1), match.group(2).lower()
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            sample["__duplicate__"] = ext
        sample[ext] = data
    if sample is not None:
        yield sample


def read_shard(url: str) -> Iterator[dict | ShardError]:
    """Raw samples (dicts of bytes keyed by extension) of one shard; a read error ends the shard as a ShardError."""
    from webdataset import gopen

    try:
        with gopen(url, "rb") as stream:
            yield from group_samples(tar_members(stream), url)
    except Exception as exn:  # unreadable, truncated or not a tar: counted, never fatal
        yield ShardError(url, f"{type(exn).__name__}: {str(exn).splitlines()[0][:120] if str(exn) else ''}")


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
