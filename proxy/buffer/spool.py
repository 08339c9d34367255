"""The on-disk spool: verdicts and samples that could not reach Redis wait here, bounded.

Layout (``buffer.spool_path()``, a 0700 directory; files 0600): append-only **segment files**
of records, each record ``[length u32][crc32 u32][body]`` (big-endian), the body being
``records.Encoded.to_bytes()`` (orjson header, then the raw payload bytes). A segment is named
``{time_ns:020d}-{target}-{pid}-{n}`` plus its state, so names sort oldest first across
processes; ``target`` names the Redis (and namespace) its records are for, so a segment is only
ever replayed into the Redis it was written for, even if proxies with different Redis servers
share a state directory:

- ``.tmp``: being created (never read);
- ``.open``: written by the one process that holds its ``flock``; each process (each compare
  worker has its own store) writes only its own segments, so no two writers share a file;
- ``.seg``: sealed (closed for writing; the writer rotates at ``SEGMENT_BYTES`` and seals when
  it is about to replay or closes);
- ``.claimed``: taken whole by a replayer, by ``flock`` then rename, so two replayers (other
  processes, or a restart) never take the same one. A replayer deletes a segment only after
  all its records were written to Redis.

A process that dies leaves its ``.open`` or ``.claimed`` files unlocked (the kernel drops its
locks): any other replayer takes them as they are. A torn last record (a crash mid-write) or a
record whose checksum fails ends the segment's replay there and is counted as ``torn``.

**Size**: ``buffer.spool_max_bytes`` bounds the whole directory (every process's files
together, measured before each append). A record that does not fit is refused and counted by
the caller as ``spool_full``; it is lost.

**fsync policy** (``buffer.spool_fsync``):

- ``batch`` (default): one fsync after each batch of records appended (one batch is what the
  compare stage gathers in ~100 ms, at most 128 verdicts), and after each seal (file and
  directory). A power loss or kernel crash loses at most the batch being written; a crash of
  the process alone loses nothing already appended (the OS has the pages).
- ``always``: an fsync after every record.
- ``never``: leave it to the OS (a power loss may lose the last seconds of the spool).

All methods do blocking file I/O: the store calls them on one thread of its own, in order.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

log = logging.getLogger("shadowproxy.spool")

SEGMENT_BYTES = 8 * 1024 * 1024
"""A writer starts a new segment beyond this, so replay takes (and deletes) bounded pieces."""
_FRAME = struct.Struct(">II")
_STATES = (".open", ".seg", ".claimed")

FsyncPolicy = Literal["batch", "always", "never"]


@dataclass(slots=True)
class Claimed:
    """A segment this process holds (locked) for replay."""

    path: Path
    file: BinaryIO


class Spool:
    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        fsync: FsyncPolicy = "batch",
        *,
        target: str = "redis",
    ) -> None:
        self.directory = directory
        self.target = target
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._size = 0
        self._serial = 0
        self.open_records = 0
        """Records in this process's open segment (not yet sealed for replay)."""
        self.torn = 0
        """Records lost to a torn or corrupt tail (a crash while they were written)."""

    # -- writing (this process's own segments only)

    def append(self, records: Sequence[bytes]) -> list[int]:
        """Append whole records in order; the indexes of those that did not fit."""
        refused: list[int] = []
        used = self.usage()
        for i, body in enumerate(records):
            frame = _FRAME.pack(len(body), zlib.crc32(body)) + body
            if used + len(frame) > self.max_bytes:
                refused.append(i)
                continue
            f = self._segment()
            f.write(frame)
            if self.fsync == "always":
                f.flush()
                os.fsync(f.fileno())
            used += len(frame)
            self._size += len(frame)
            self.open_records += 1
            if self._size >= SEGMENT_BYTES:
                self.seal()
        if self._file is not None:
            self._file.flush()
            if self.fsync == "batch":
                os.fsync(self._file.fileno())
        return refused

    def seal(self) -> None:
        """Close this process's open segment for writing, so a replayer may take it."""
        f, path = self._file, self._path
        self._file, self._path = None, None
        if f is None or path is None:
            return
        try:
            f.flush()
            if self.open_records == 0:
                path.unlink()
                return
            if self.fsync != "never":
                os.fsync(f.fileno())
            path.rename(path.with_suffix(".seg"))
            self._sync_dir()
        finally:
            f.close()  # drops the lock, after the rename
            self._size = 0
            self.open_records = 0

    def _segment(self) -> BinaryIO:
        if self._file is not None:
            return self._file
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._serial += 1
        stem = f"{time.time_ns():020d}-{self.target}-{os.getpid()}-{self._serial}"
        tmp = self.directory / f"{stem}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        # Locked before it has a name replayers look at: they can never take it while open.
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = tmp.with_suffix(".open")
        tmp.rename(path)
        self._file, self._path = os.fdopen(fd, "ab"), path
        return self._file

    def _sync_dir(self) -> None:
        if self.fsync == "never":
            return
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- replaying (any process; segments are taken whole)

    def usage(self) -> int:
        try:
            with os.scandir(self.directory) as entries:
                return sum(e.stat().st_size for e in entries if e.is_file())
        except FileNotFoundError:
            return 0

    def pending(self) -> bool:
        """Whether any segment but this process's open one waits (or may wait) for replay."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return False
        own = self._path.name if self._path is not None else None
        return any(n.endswith(_STATES) and n != own and self._mine(n) for n in names)

    def _mine(self, name: str) -> bool:
        """Whether a segment holds records for this spool's Redis."""
        return name.split("-", 2)[1:2] == [self.target]

    def claim_oldest(self) -> Claimed | None:
        """Lock and take the oldest segment nobody holds (sealed, or left by a dead process)."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return None
        for name in names:
            path = self.directory / name
            if path == self._path or not name.endswith((*_STATES, ".tmp")) or not self._mine(name):
                continue
            claimed = _lock(path)
            if claimed is None:
                continue
            if name.endswith(".tmp"):  # a writer died before naming it: nothing in it is sealed
                path.unlink()
                claimed.file.close()
                continue
            if not name.endswith(".claimed"):
                claimed.path = path.with_suffix(".claimed")
                path.rename(claimed.path)
            return claimed
        return None

    def read(self, claimed: Claimed) -> list[bytes]:
        """Every whole record of a claimed segment, in order; a torn tail is counted, not read."""
        claimed.file.seek(0)
        data = claimed.file.read()
        records, pos = [], 0
        while pos + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, pos)
            body = data[pos + _FRAME.size : pos + _FRAME.size + length]
            if len(body) < length or zlib.crc32(body) != crc:
                break
            records.append(body)
            pos += _FRAME.size + length
        if pos < len(data):
            self.torn += 1
            log.warning("spool segment %s ends in a torn record (a crash mid-write)", claimed.path)
        return records

    def done(self, claimed: Claimed) -> None:
        """Every record was written to Redis: delete the segment (still holding its lock)."""
        try:
            claimed.path.unlink()
            self._sync_dir()
        finally:
            claimed.file.close()

    def release(self, claimed: Claimed) -> None:
        """Give a claimed segment back (Redis failed mid-way); it is replayed again later, and
        the records already written are not written twice (``records`` is idempotent)."""
        claimed.file.close()

    def close(self) -> None:
        self.seal()


def _lock(path: Path) -> Claimed | None:
    """``path`` opened and exclusively locked, or None if someone holds it or it is gone."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Still the file under that name: not deleted or renamed by a replayer meanwhile.
        if os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:
            raise FileNotFoundError(path)
    except (BlockingIOError, FileNotFoundError):
        f.close()
        return None
    except BaseException:
        f.close()
        raise
    return Claimed(path, f)
