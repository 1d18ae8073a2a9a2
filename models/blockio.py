"""The block-file seam: the one protocol through which every host read, write and flush of an image passes.

Everything the qcow2 implementation does to its host file goes through a `BlockFile`.
That is what lets the fault-injecting layer (`harness.faultfile`) sit underneath and
record, drop, tear or truncate host operations. Every write names its *write site*
(which on-disk structure it updates), so crash points and findings can be told apart
by what was being written.
"""

from __future__ import annotations

import enum
import errno
import operator
import os
import struct
from typing import Protocol, runtime_checkable


SECTOR = 512
"""The guest and host sector: the unit of atomic writes in the device model, and of judging."""

# struct formats of 0..64 whole sectors: splitting bytes into sectors in C ("512s" per
# sector), about 2.7 times faster than slicing them in a comprehension.
_SPLIT_BATCH = 64
_SECTOR_STRUCTS = [struct.Struct("512s" * n) for n in range(_SPLIT_BATCH + 1)]


def split_sectors(data: bytes | bytearray | memoryview) -> list[bytes]:
    """`data` (whole sectors) as one bytes object per sector, in order."""
    n, rest = divmod(len(data), SECTOR)
    if rest:
        raise ValueError(f"split_sectors: {len(data)} bytes is not a whole number of {SECTOR}-byte sectors")
    if n <= _SPLIT_BATCH:
        return list(_SECTOR_STRUCTS[n].unpack(data))
    out: list[bytes] = []
    batch, step = _SECTOR_STRUCTS[_SPLIT_BATCH], _SPLIT_BATCH * SECTOR
    whole = n // _SPLIT_BATCH * step
    for offset in range(0, whole, step):
        out.extend(batch.unpack_from(data, offset))
    if n % _SPLIT_BATCH:
        out.extend(_SECTOR_STRUCTS[n % _SPLIT_BATCH].unpack_from(data, whole))
    return out


def sector_runs(sectors: list[int], limit: int):
    """(start, end) index ranges of the runs of consecutive sectors, each at most `limit` long (breaks found in C)."""
    n = len(sectors)
    # breaks[k] is 1 where sectors[k + 1] does not follow sectors[k]
    breaks = bytes(map(operator.ne, sectors[1:], map((1).__add__, sectors[:-1])))
    i = 0
    while i < n:
        k = breaks.find(1, i)
        run_end = n if k < 0 else k + 1
        while i < run_end:
            j = min(run_end, i + limit)
            yield i, j
            i = j


class CacheMode(enum.StrEnum):
    """How the image uses its host file, as QEMU names the cache modes; also the model's durability rule."""

    WRITEBACK = "writeback"
    WRITETHROUGH = "writethrough"
    DIRECTSYNC = "directsync"

    @property
    def flushes_writes(self) -> bool:
        """writethrough/directsync: every write is followed by a flush before it returns (emulated FUA)."""
        return self is not CacheMode.WRITEBACK


class WriteSite(enum.StrEnum):
    """What a host write updates; mirrors QEMU's BLKDBG_* events at the level qcrash needs."""

    HEADER = "header"  # cluster 0 rewrite (qcow2_update_header)
    DIRTY_BIT = "dirty-bit"  # the 8-byte incompatible_features field (mark_dirty)
    REFTABLE_SWITCH = "reftable-switch"  # header bytes 48..59: new refcount table location
    L1 = "l1"  # one active L1 entry, or the whole L1 at create time
    L2 = "l2"  # an L2 table written back from the metadata cache
    L2_ALLOC = "l2-alloc"  # a freshly allocated L2 table's first write
    REFBLOCK = "refblock"  # a refcount block written back from the metadata cache
    REFBLOCK_ALLOC = "refblock-alloc"  # a freshly allocated refcount block's first write
    REFTABLE = "reftable"  # one refcount-table entry (refblock hookup)
    REFTABLE_GROW = "reftable-grow"  # a whole new, larger refcount table
    DATA = "data"  # guest data
    SNAPSHOT_TABLE = "snapshot-table"  # a whole new snapshot table (qcow2_write_snapshots)
    SNAPSHOT_HEADER = "snapshot-header"  # header bytes 60..71: nb_snapshots and snapshots_offset
    SNAPSHOT_L1 = "snapshot-l1"  # a snapshot's L1 copy, or the active L1 rewritten by a snapshot operation
    SNAPSHOT_L2 = "snapshot-l2"  # an L2 table whose COPIED flags a snapshot operation changed
    SNAPSHOT_REFBLOCK = "snapshot-refblock"  # a refcount block written inside a snapshot operation
    REPAIR = "repair"  # a write made by check/repair
    CREATE = "create"  # writes that lay out a fresh image
    OTHER = "other"


@runtime_checkable
class BlockFile(Protocol):
    """A byte-addressed host file. Reads past the end return only what exists."""

    name: str

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes, site: WriteSite = WriteSite.OTHER) -> None: ...

    def flush(self) -> None: ...

    def truncate(self, size: int) -> None: ...

    def size(self) -> int: ...


INT64_MAX = (1 << 63) - 1
"""No host range may end beyond this (QEMU's rule for every table: INT64_MAX - length < offset is invalid)."""


def read_exact(f: BlockFile, offset: int, length: int) -> bytes:
    """Read `length` bytes, padding with zeros past the end of the file (qcow2 reads holes as 0).

    A range no file can hold (negative, or past 2^63) is bad metadata: a named HostRangeError.
    """
    _check_range(f.name, offset, length)
    data = f.pread(offset, length)
    if len(data) < length:
        data += bytes(length - len(data))
    return data


class MemoryFile:
    """An in-memory host file: the fast default for fuzzing.

    It cannot be sparse, so growth past `max_size` fails with ENOSPC (a named HostIOError)
    instead of allocating what a hostile table entry claims (a data cluster at 2^50).
    """

    DEFAULT_MAX_SIZE = 1 << 30

    def __init__(self, data: bytes | bytearray = b"", name: str = "<memory>", *, max_size: int | None = None) -> None:
        self.buf = bytearray(data)
        self.name = name
        self.max_size = self.DEFAULT_MAX_SIZE if max_size is None else max_size

    def _check_growth(self, op: str, offset: int, end: int) -> None:
        if end > len(self.buf) and end > self.max_size:
            raise _io_error(self.name, op, offset, end - offset, errno.ENOSPC,
                            f"an in-memory file grows to at most {self.max_size:#x} bytes")

    def pread(self, offset: int, length: int) -> bytes:
        _check_range(self.name, offset, length)
        return bytes(self.buf[offset : offset + length])

    def pwrite(self, offset: int, data: bytes, site: WriteSite = WriteSite.OTHER) -> None:
        _check_range(self.name, offset, len(data))
        end = offset + len(data)
        self._check_growth("write", offset, end)
        if end > len(self.buf):
            self.buf.extend(bytes(end - len(self.buf)))
        self.buf[offset:end] = data

    def flush(self) -> None:
        pass

    def truncate(self, size: int) -> None:
        _check_range(self.name, size, 0)
        self._check_growth("truncate", size, size)
        if size < len(self.buf):
            del self.buf[size:]
        else:
            self.buf.extend(bytes(size - len(self.buf)))

    def size(self) -> int:
        return len(self.buf)

    def getvalue(self) -> bytes:
        return bytes(self.buf)


class OsFile:
    """A real file, through os.pread / os.pwrite / os.fdatasync."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, create: bool = False) -> None:
        self.name = os.fspath(path)
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        self.fd = os.open(self.name, flags, 0o644)

    def pread(self, offset: int, length: int) -> bytes:
        _check_range(self.name, offset, length)
        chunks = []
        while length > 0:
            chunk = _os_call(self.name, "read", offset, length, os.pread, self.fd, min(length, 1 << 30), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    def pwrite(self, offset: int, data: bytes, site: WriteSite = WriteSite.OTHER) -> None:
        _check_range(self.name, offset, len(data))
        view = memoryview(data)
        while view:
            n = _os_call(self.name, "write", offset, len(view), os.pwrite, self.fd, view, offset)
            view = view[n:]
            offset += n

    def flush(self) -> None:
        _os_call(self.name, "flush", 0, 0, os.fdatasync, self.fd)

    def truncate(self, size: int) -> None:
        _check_range(self.name, size, 0)
        _os_call(self.name, "truncate", size, 0, os.ftruncate, self.fd, size)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CountingFile:
    """A pass-through wrapper that counts host writes and flushes by write site (for cost tests and benchmarks)."""

    def __init__(self, inner: BlockFile) -> None:
        self.inner = inner
        self.name = inner.name
        self.writes: list[WriteSite] = []
        self.flushes = 0
        self.trace: list[str] = []

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def pwrite(self, offset: int, data: bytes, site: WriteSite = WriteSite.OTHER) -> None:
        self.writes.append(site)
        self.trace.append(str(site))
        self.inner.pwrite(offset, data, site)

    def flush(self) -> None:
        self.flushes += 1
        self.trace.append("F")
        self.inner.flush()

    def truncate(self, size: int) -> None:
        self.trace.append("T")
        self.inner.truncate(size)

    def size(self) -> int:
        return self.inner.size()

    def reset(self) -> None:
        self.writes.clear()
        self.flushes = 0
        self.trace.clear()


def _check_range(name: str, offset: int, length: int) -> None:
    # A negative offset would silently index from the end of a bytearray; one past 2^63
    # overflows os.pread's off_t (the OverflowError hostile table entries used to raise).
    if offset < 0 or length < 0 or offset > INT64_MAX - length:
        from models.qcow2.errors import HostRangeError  # lazy: models.qcow2 imports this module

        raise HostRangeError(name, None, "host range", length,
                             f"invalid host range offset={offset} length={length}: must be non-negative and end below 2^63")


def _io_error(name: str, op: str, offset: int, length: int, err: int, detail: str = "") -> Exception:
    from models.qcow2.errors import HostIOError  # lazy: models.qcow2 imports this module

    return HostIOError(name, op, offset, length, err, detail)


def _os_call(name: str, op: str, offset: int, length: int, fn, *args):
    try:
        return fn(*args)
    except OSError as exc:
        raise _io_error(name, op, offset, length, exc.errno or errno.EIO) from exc
