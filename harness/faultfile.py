"""The fault-injecting file layer: a pass-through `BlockFile` that records every host operation in a `WriteLog`.

The device model
================

This is the device that sits below a qcow2 image, as CRASH-CONTRACT.md ("What the
device below the image may do at a crash") states it. The harness may produce any of
the following, and `harness.crashstates` names and enumerates them:

1. **Flushed writes are kept.** Every host write (and truncate) that completed before
   the last completed host flush is part of the crash image.
2. **Unflushed writes are independent.** Each host write after that flush (the ops of
   the current *epoch*) may be kept or lost, independently of the others and of their
   order: any subset survives. Kept ones are applied in log order, so a kept later
   write over the same bytes wins.
3. **Kept writes may be torn at sector boundaries.** A kept write longer than one
   sector may keep any subset of its sectors. Sectors are the host file's absolute
   512-byte sectors: a write that starts or ends mid-sector has a partial first or last
   piece, and each piece tears as a unit. A torn write's sectors that did not land read
   as the bytes that were there before it.
4. **Unflushed growth may be lost.** The file may come back shorter than its size at
   the crash, down to the smallest size it had since the last flush (the last flushed
   size, unless an unflushed truncate shrank it further), never shorter. A dropped
   write's growth is lost with it, unless a later kept write extends the file further,
   in which case the gap reads as zeros.
5. **A crash may come between any two host operations.** Crash *point* p means "ops
   0..p-1 happened, op p did not start"; points run from 0 to `len(log)`. An op in
   flight at the crash (the flush at index p included) did not complete, so a flush
   only counts once its point is passed.
6. **Harsh mode (off by default): garbage.** A torn write's sectors that did not land
   may hold garbage instead of the old bytes. Under it the harness claims robustness
   only (no unexpected exception, no hang, a clear error or a successful repair), not
   the data of that write.

The layer itself does none of this at write time: it passes every operation through to
the inner file, so reads always see the "everything kept" state, and it records the
operation (references to the written bytes, not copies, where they are immutable).
Crash images are built afterwards from the log (`harness.crashstates.CrashImageBuilder`),
as Pebble's `CrashClone` builds them from `syncedData` plus unsynced blocks and
SQLite's `test6.c` from its write list.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from models.blockio import SECTOR, BlockFile, WriteSite

if TYPE_CHECKING:
    from harness.crashstates.images import Extents

__all__ = ["HostOpKind", "HostOp", "WriteLog", "FaultInjectingFile", "sector_pieces", "ErrorKind", "ErrorPoint",
           "ErrorPlan"]
# The unit of tearing (device model rule 3) is models.blockio.SECTOR: the host file's absolute 512-byte sectors.


class HostOpKind(enum.StrEnum):
    """What a recorded host operation did."""

    WRITE = "write"
    FLUSH = "flush"
    TRUNCATE = "truncate"


@dataclass(frozen=True, slots=True)
class HostOp:
    """One recorded host operation.

    `offset` is the write's start, or the new size for TRUNCATE (0 for FLUSH). `data` is
    the written bytes (empty for FLUSH and TRUNCATE). `site` is the write site
    (WriteSite.OTHER for FLUSH and TRUNCATE, which do not name one). `size_after` is the
    host file's size once the operation completed.
    """

    index: int
    kind: HostOpKind
    offset: int
    data: bytes
    site: WriteSite
    size_after: int

    def __str__(self) -> str:
        if self.kind is HostOpKind.WRITE:
            return f"#{self.index} write {self.offset}+{len(self.data)} site={self.site} size={self.size_after}"
        if self.kind is HostOpKind.TRUNCATE:
            return f"#{self.index} truncate {self.offset}"
        return f"#{self.index} flush"


_SET_INDEX, _SET_KIND, _SET_OFFSET, _SET_DATA, _SET_SITE, _SET_SIZE = (
    getattr(HostOp, f.name).__set__ for f in dataclasses.fields(HostOp))
_new_op = object.__new__


def _host_op(index: int, kind: HostOpKind, offset: int, data: bytes, site: WriteSite, size_after: int) -> HostOp:
    """HostOp(...), its slots set directly: a frozen dataclass's __init__ goes through object.__setattr__
    for each field, a third of the cost of recording a write (a 2 MiB guest write with 512-byte clusters
    records thousands). The fields are set one by one, not in a loop: a loop cost as much again."""
    op = _new_op(HostOp)
    _SET_INDEX(op, index)
    _SET_KIND(op, kind)
    _SET_OFFSET(op, offset)
    _SET_DATA(op, data)
    _SET_SITE(op, site)
    _SET_SIZE(op, size_after)
    return op


def sector_pieces(offset: int, length: int) -> list[tuple[int, int]]:
    """Split the host range [offset, offset+length) at absolute 512-byte boundaries.

    Returns the pieces as absolute (start, end) pairs; piece i is "sector i of the
    write" in a crash state's tears, so a write starting mid-sector has a short piece 0.
    """
    end = offset + length
    pieces = []
    lo = offset
    while lo < end:
        hi = min(end, (lo // SECTOR + 1) * SECTOR)
        pieces.append((lo, hi))
        lo = hi
    return pieces


def sector_count(offset: int, length: int) -> int:
    """The number of pieces `sector_pieces(offset, length)` returns, without building them."""
    if length <= 0:
        return 0
    return (offset + length - 1) // SECTOR - offset // SECTOR + 1


class WriteLog:
    """The ordered host operations since wrapping (or the last `reset_log`), plus the content they started from.

    Crash points are 0..len(log): point p means ops[0:p] happened. The ops after the last
    FLUSH before p form the *unsynced epoch* at p.
    """

    def __init__(self, base: bytes = b"") -> None:
        from harness.crashstates.images import Extents  # (that module builds on this one)

        # A large image being judged may be laid out as Extents over immutable bytes: kept as it is.
        self.base = base if type(base) is Extents else bytes(base)
        self.base_size = len(self.base)
        self.ops: list[HostOp] = []
        # _flush_before[p] = index of the last FLUSH among ops[0:p], or -1; one entry per point.
        self._flush_before: list[int] = [-1]

    def append(self, kind: HostOpKind, offset: int, data: bytes, site: WriteSite, size_after: int) -> HostOp:
        """Record one completed operation and return it."""
        op = _host_op(len(self.ops), kind, offset, data, site, size_after)
        self.ops.append(op)
        self._flush_before.append(op.index if kind is HostOpKind.FLUSH else self._flush_before[-1])
        return op

    def __len__(self) -> int:
        return len(self.ops)

    def __getitem__(self, index: int) -> HostOp:
        return self.ops[index]

    def __iter__(self) -> Iterator[HostOp]:
        return iter(self.ops)

    def check_point(self, point: int) -> None:
        """Raise ValueError unless `point` is a crash point of this log (0..len)."""
        if not isinstance(point, int) or isinstance(point, bool):
            problem = f"is a {type(point).__name__}, not an int"
        elif not 0 <= point <= len(self.ops):
            problem = "is out of range"
        else:
            return
        raise ValueError(f"crash point {point!r} {problem}: a log of {len(self.ops)} ops has points 0..{len(self.ops)}")

    def last_flush_before(self, point: int) -> int:
        """The index of the last FLUSH op among ops[0:point], or -1 if there is none."""
        self.check_point(point)
        return self._flush_before[point]

    def unsynced(self, point: int) -> list[HostOp]:
        """The WRITE and TRUNCATE ops after the last flush before `point` (the unsynced epoch)."""
        return self.ops[self.last_flush_before(point) + 1 : point]

    def size_at(self, point: int) -> int:
        """The file size once ops[0:point] completed (the "everything kept" size)."""
        self.check_point(point)
        return self.ops[point - 1].size_after if point else self.base_size

    def durable_size(self, point: int) -> int:
        """The file size at the last flush before `point` (the base size if there is none)."""
        return self.size_at(self.last_flush_before(point) + 1)

    def sites_at(self, point: int) -> tuple[WriteSite, ...]:
        """The distinct write sites of the unsynced writes at `point`, in order of first appearance."""
        sites: dict[WriteSite, None] = {}
        for op in self.unsynced(point):
            if op.kind is HostOpKind.WRITE:
                sites.setdefault(op.site)
        return tuple(sites)


class ErrorKind(enum.StrEnum):
    """How a host operation fails (device model, I/O errors): EIO, ENOSPC on growth, or a short write."""

    EIO = "eio"  # the operation fails with nothing done
    ENOSPC = "enospc"  # a write or truncate that grows the file fails with nothing done
    SHORT = "short"  # a write lands only its first sectors, then fails with EIO


@dataclass(frozen=True, slots=True)
class ErrorPoint:
    """Fail the `ordinal`-th host operation of kind `op` ("read", "write", "flush", "truncate"), counted from 0."""

    op: str
    ordinal: int
    kind: ErrorKind = ErrorKind.EIO

    def __str__(self) -> str:
        return f"{self.kind}@{self.op}#{self.ordinal}"


@dataclass
class ErrorPlan:
    """Seeded error points for one run; each point fires once. `sticky`: after the first error every later op fails too (a dead disk)."""

    points: tuple[ErrorPoint, ...] = ()
    sticky: bool = False
    counts: dict[str, int] = field(default_factory=lambda: {"read": 0, "write": 0, "flush": 0, "truncate": 0})
    fired: list[ErrorPoint] = field(default_factory=list)

    def next(self, op: str, grows: bool) -> ErrorPoint | None:
        """Count one operation of kind `op`; the error point that fails it, if any."""
        n = self.counts[op]
        self.counts[op] = n + 1
        if self.sticky and self.fired:
            return self.fired[0]
        for p in self.points:
            if p.op == op and p.ordinal == n and (p.kind is not ErrorKind.ENOSPC or grows):
                self.fired.append(p)
                return p
        return None


def _host_error(name: str, op: str, offset: int, length: int, point: ErrorPoint) -> Exception:
    from models.qcow2.errors import HostIOError  # lazy: keeps this module importable on its own

    err = errno.ENOSPC if point.kind is ErrorKind.ENOSPC else errno.EIO
    return HostIOError(name, op, offset, length, err, f"injected: {point}")


class FaultInjectingFile:
    """A `BlockFile` that passes every operation to `inner` and records it in `.log`.

    Reads come from `inner`, i.e. the state where every operation was kept. Recording
    costs one small object per operation: `bytes` data is kept by reference, and
    `bytearray` or `memoryview` data is copied once (the caller may reuse its buffer).
    An operation that `inner` rejects (raises) is not recorded. An empty write is recorded
    but not passed on: it is a no-op (it never extends the file), which not every backend
    agrees on.
    """

    def __init__(self, inner: BlockFile, errors: ErrorPlan | None = None, *, base: bytes | Extents | None = None) -> None:
        """`base`: what `inner` holds now as an immutable image (bytes or Extents), when the caller has it:
        the log starts from it instead of a copy of `inner` (a restart from a judged image)."""
        self.inner = inner
        self.name = inner.name
        self._size = inner.size()
        # A file that can hand over its bytes as they lie (a judged image as Extents) is not read whole.
        image = getattr(inner, "frozen_image", None)
        if base is None:
            base = image() if image is not None else inner.pread(0, self._size)
        elif len(base) != self._size:
            raise ValueError(f"{self.name}: a log base of {len(base)} bytes for a file of {self._size}")
        self.log = WriteLog(base)
        # I/O errors (device model, failing disk): an operation an ErrorPlan fails is not
        # passed on and not recorded, except the sectors a short write did land.
        self.errors = errors

    def pread(self, offset: int, length: int) -> bytes:
        if self.errors is not None:
            point = self.errors.next("read", False)
            if point is not None:
                raise _host_error(self.name, "read", offset, length, point)
        return self.inner.pread(offset, length)

    def _planned(self, op: str, offset: int, length: int, grows: bool) -> ErrorPoint | None:
        if self.errors is None:
            return None
        return self.errors.next(op, grows)

    def pwrite(self, offset: int, data: bytes, site: WriteSite = WriteSite.OTHER) -> None:
        if type(data) is not bytes:
            data = bytes(data)
        point = self._planned("write", offset, len(data), offset + len(data) > self._size) if data and self.errors is not None else None
        if point is not None:
            if point.kind is ErrorKind.SHORT and len(data) > SECTOR:
                # The first whole sectors (at least one piece) land; the rest do not.
                pieces = sector_pieces(offset, len(data))
                keep = pieces[max(0, len(pieces) // 2 - 1)][1] - offset
                self.pwrite(offset, data[:keep], site)
            raise _host_error(self.name, "write", offset, len(data), point)
        if data:
            self.inner.pwrite(offset, data, site)
            if offset + len(data) > self._size:
                self._size = offset + len(data)
        elif offset < 0:
            raise ValueError(f"{self.name}: invalid host range offset={offset} length=0: must be non-negative")
        # An empty write is a no-op (POSIX pwrite of 0 bytes never extends a file), so it
        # is recorded but not passed on: backends disagree about extending for it.
        self.log.append(HostOpKind.WRITE, offset, data, site if type(site) is WriteSite else WriteSite(site), self._size)

    def flush(self) -> None:
        point = self._planned("flush", 0, 0, False)
        if point is not None:
            raise _host_error(self.name, "flush", 0, 0, point)
        self.inner.flush()
        self.log.append(HostOpKind.FLUSH, 0, b"", WriteSite.OTHER, self._size)

    def truncate(self, size: int) -> None:
        point = self._planned("truncate", size, 0, size > self._size)
        if point is not None:
            raise _host_error(self.name, "truncate", size, 0, point)
        self.inner.truncate(size)
        self._size = size
        self.log.append(HostOpKind.TRUNCATE, size, b"", WriteSite.OTHER, size)

    def size(self) -> int:
        return self._size

    def point(self) -> int:
        """The current crash point: the number of recorded operations."""
        return len(self.log)

    def reset_log(self) -> WriteLog:
        """Start a fresh log whose base is the inner file's current content; return the old log."""
        old = self.log
        self._size = self.inner.size()
        self.log = WriteLog(self.inner.pread(0, self._size))
        return old
