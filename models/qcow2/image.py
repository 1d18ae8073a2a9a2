"""Qcow2Image: the state of one open image, its open/close/flush life cycle, and its guest request checks.

The work is done by collaborators, as QEMU splits qcow2.c: `hostio` (every host write and
flush, header rewrites), `guestmap` (guest-to-host lookup, reads), `cluster_write`
(allocation, L2 updates, COW; its docstring states the guest-data ordering rule),
`discard` (zero flag, discard), `refcount` and `freesearch` (cluster allocation and
freeing), `dirty` (the lazy-refcounts dirty-bit discipline), `create` (a fresh image's
layout) and `overlap` (metadata overlap checks). This class checks each guest request
once and owns the state they share.
"""

from __future__ import annotations

import struct
from typing import Callable

from models.blockio import BlockFile, CacheMode, WriteSite, read_exact
from models.qcow2 import cluster_write, create, dirty, discard, guestmap, inject, spec
from models.qcow2.cache import TableCache
from models.qcow2.entries import ClusterType
from models.qcow2.errors import ImageDead, ImageNotWritable, InvalidRequest
from models.qcow2.geometry import Geometry
from models.qcow2.header import ParsedHeader, read_header
from models.qcow2.hostio import HostIO
from models.qcow2.overlap import OverlapGuard
from models.qcow2.refcount import Refcounts
from models.qcow2.scan import u64_array
from models.qcow2.structs import Header


class Qcow2Image:
    """An open qcow2 image over a BlockFile."""

    _pwrite: Callable[[int, bytes, WriteSite], None]
    _file_flush: Callable[[], None]

    def __init__(self, file: BlockFile, parsed: ParsedHeader, *, readonly: bool, cache_mode: CacheMode,
                 lazy_refcounts: bool | None, log: Callable[[str], None] | None) -> None:
        self.file = file
        self.path = file.name
        self.hdr: Header = parsed.header
        self.extensions = parsed.extensions
        self.geo: Geometry = parsed.geometry
        self.readonly = readonly
        self.cache_mode = CacheMode(cache_mode)
        self.log = log or (lambda _msg: None)
        self.closed = False
        self.dead = False  # QEMU's bs->drv = NULL after a fatal corruption event
        self._corruption_logged = False
        self.dirty = bool(self.hdr.incompatible_features & spec.DIRTY_BIT)
        header_lazy = bool(self.hdr.compatible_features & spec.LAZY_REFCOUNTS_BIT)
        self.lazy = header_lazy if lazy_refcounts is None else lazy_refcounts
        if self.lazy and self.hdr.version < 3:
            raise InvalidRequest(f"{self.path}: Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
        # The write choke point and the flush, bound once (no extra call on the hot path); see hostio.py.
        self.io = HostIO(self)
        self._pwrite, self._file_flush = self.io.pwrite, self.io.file_flush
        cs = self.geo.cluster_size
        self.l2cache = TableCache("l2", self._read_table, self._pwrite, cs, WriteSite.L2, self._file_flush)
        self.refcache = TableCache("refcount", self._read_table, self._pwrite, cs, WriteSite.REFBLOCK, self._file_flush)
        self._load_tables()
        self.refcounts = Refcounts(self)
        self.overlap = OverlapGuard(self)

    # ---- cluster allocation (refcount.py) ------------------------------------------------
    def alloc_clusters(self, n: int = 1) -> int:
        return self.refcounts.alloc_clusters(n)

    def free_cluster(self, host_offset: int) -> None:
        self.refcounts.free_cluster(host_offset)

    def refcount(self, cluster: int) -> int:
        return self.refcounts.refcount(cluster)

    # ---- open / create ------------------------------------------------------------------
    @classmethod
    def open(cls, file: BlockFile, *, readonly: bool = False, cache_mode: CacheMode | str = CacheMode.WRITEBACK,
             lazy_refcounts: bool | None = None, check_mode: bool = False,
             log: Callable[[str], None] | None = None,
             on_repair: Callable[[object], None] | None = None) -> "Qcow2Image":
        """Open and validate; a read-write open of a dirty image repairs it first (unless check_mode)."""
        parsed = read_header(file, writable=not readonly, check_mode=check_mode)
        if not readonly and not check_mode and parsed.header.incompatible_features & spec.IncompatFeature.DIRTY:
            dirty.repair_dirty(file, log, on_repair)
            parsed = read_header(file, writable=True)
        img = cls(file, parsed, readonly=readonly, cache_mode=CacheMode(cache_mode), lazy_refcounts=lazy_refcounts, log=log)
        if not check_mode:
            img.overlap.load_snapshots()  # qcow2_read_snapshots: QEMU's open refuses a table it cannot read
        if not readonly and img.hdr.version >= 3 and img.hdr.autoclear_features & ~int(spec.AUTOCLEAR_MASK):
            img.hdr.autoclear_features &= int(spec.AUTOCLEAR_MASK)
            img.io.update_header()
            img._file_flush()
        if not readonly and img.dirty and not img.lazy:
            dirty.mark_clean(img)
        return img

    @classmethod
    def create(cls, file: BlockFile, size: int, *, version: int = 3, cluster_size: int = 65536,
               refcount_bits: int = 16, lazy_refcounts: bool = False) -> None:
        """Lay out a fresh image as `qemu-img create -f qcow2` does: header, reftable, refblock, L1."""
        create.create(cls, file, size, version=version, cluster_size=cluster_size, refcount_bits=refcount_bits,
                      lazy_refcounts=lazy_refcounts)

    def _read_table(self, offset: int, length: int) -> bytes:
        return read_exact(self.file, offset, length)

    def _load_tables(self) -> None:
        hdr = self.hdr
        self.l1 = _unpack_u64s(read_exact(self.file, hdr.l1_table_offset, hdr.l1_size * 8)) if hdr.l1_size else []
        self.reftable_offset = hdr.refcount_table_offset
        n = hdr.refcount_table_clusters * self.geo.cluster_size // 8
        # An array, not a list: 131,072 entries with 1 MiB clusters, read at every open of every crash image.
        self.reftable = u64_array(read_exact(self.file, self.reftable_offset, n * 8)) if n else []

    # ---- dirty bit (dirty.py) ------------------------------------------------------------------
    def _need_accurate_refcounts(self) -> bool:
        return not self.dirty

    # ---- guest requests: checked here, done by guestmap / cluster_write / discard -----------------
    def _check_request(self, offset: int, length: int, what: str) -> None:
        if self.closed:
            raise InvalidRequest(f"{self.path}: {what} on a closed image")
        if self.dead:
            raise ImageDead(f"{self.path}: {what}: No medium found (the image was marked corrupt)")
        if offset < 0 or length < 0 or offset + length > self.hdr.size:
            raise InvalidRequest(
                f"{self.path}: {what} offset={offset} length={length}: must lie within the virtual size {self.hdr.size}")

    def _require_writable(self, what: str) -> None:
        if self.readonly:
            raise ImageNotWritable(f"{self.path}: {what}: image opened read-only")

    def _l2_table_offset(self, l1_index: int) -> int:
        return guestmap.l2_table_offset(self, l1_index)

    def _lookup(self, guest: int) -> tuple[int, ClusterType, int]:
        """(L2 entry, its type, host cluster offset) for a guest offset."""
        return guestmap.lookup(self, guest)

    def read(self, offset: int, length: int) -> bytes:
        self._check_request(offset, length, "read")
        return guestmap.read(self, offset, length)

    def is_allocated(self, guest: int) -> bool:
        """Whether the guest cluster holding `guest` maps to a data cluster (for judging foreign data)."""
        return guestmap.lookup(self, guest)[1] is ClusterType.NORMAL

    def allocated_guest_clusters(self) -> list[int]:
        return guestmap.allocated_guest_clusters(self)

    def write(self, offset: int, data: bytes) -> None:
        self._check_request(offset, len(data), "write")
        self._require_writable("write")
        cluster_write.write(self, offset, data)
        self._after_write()

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_request(offset, length, "write_zeroes")
        self._require_writable("write_zeroes")
        discard.write_zeroes(self, offset, length)
        self._after_write()

    def discard(self, offset: int, length: int) -> None:
        self._check_request(offset, length, "discard")
        self._require_writable("discard")
        discard.discard(self, offset, length)

    def _after_write(self) -> None:
        if self.cache_mode.flushes_writes and not inject.on("writethrough-no-flush"):
            self.flush()

    # ---- flush / close / options --------------------------------------------------------
    def _write_caches(self, *, force_refcounts: bool = False) -> None:
        """QEMU's qcow2_write_caches: L2 tables, then refcount blocks unless the image is dirty."""
        self.l2cache.write()
        if force_refcounts or self._need_accurate_refcounts():
            self.refcache.write()

    def flush(self) -> None:
        if self.readonly or self.closed or self.dead:
            return
        self._write_caches()
        self._file_flush()

    def write_all_metadata(self) -> None:
        """Write every cached table, refcount blocks included even while dirty, and flush (as before a check)."""
        if self.readonly or self.closed or self.dead:
            return
        self._write_caches(force_refcounts=True)
        self._file_flush()

    def set_lazy_refcounts(self, on: bool) -> None:
        """Runtime switch (qemu-io `reopen -o lazy-refcounts=...`); switching off marks the image clean."""
        if on and self.hdr.version < 3:
            raise InvalidRequest(f"{self.path}: Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
        if not on and self.lazy and not self.readonly:
            dirty.mark_clean(self)
        self.lazy = on

    def close(self) -> None:
        if self.closed:
            return
        if not self.readonly and not self.dead:
            if self.dirty:
                dirty.mark_clean(self)
            else:
                self._write_caches(force_refcounts=True)
                self._file_flush()
        self.closed = True

    def abort(self) -> None:
        """Stop at once, as after a crash: no cache write-back, no flush, no header update."""
        self.closed = True

    def release(self) -> None:
        """Drop the cached tables now, without writing them (after close or abort, or on a read-only image).

        The image sits in reference cycles (its caches and HostIO call back into it) that
        only the cyclic collector frees; with 2 MiB clusters each cached table is 2 MiB.
        Dropping them here frees that memory at once and leaves small objects to the
        collector.
        """
        self.closed = True
        self.l2cache.tables.clear()
        self.refcache.tables.clear()
        self.l2cache.dirty.clear()
        self.refcache.dirty.clear()
        # The cycles themselves are broken too (the I/O choke point, the refcount and overlap helpers
        # point back at the image, the caches call its methods), so reference counting frees the image,
        # its tables and its file at once, without waiting for the collector.
        self.l1 = self.reftable = []
        for cache in (self.l2cache, self.refcache):
            cache.read = cache.write_fn = cache.file_flush = cache.depends = None
        self.io = self.refcounts = self.overlap = self._pwrite = self._file_flush = None

    def __enter__(self) -> "Qcow2Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        return self.hdr.size


def _unpack_u64s(raw: bytes) -> list[int]:
    return list(struct.unpack(f">{len(raw) // 8}Q", raw[: len(raw) // 8 * 8]))

