"""Qcow2Image: create, open, guest read/write/write_zeroes/discard/flush/close, and the dirty-bit discipline.

Dirty-bit discipline (lazy refcounts), as QEMU's qcow2_mark_dirty / qcow2_mark_clean:

- before the first L2 update whose refcount increase is postponed, the 8-byte
  incompatible_features field is written with bit 0 set and flushed; only then is the
  image treated as dirty in memory;
- while dirty, a guest flush writes L2 tables but not refcount blocks, and L2 tables
  no longer wait for refcount blocks;
- a clean close (or switching lazy refcounts off) writes every cached table, flushes,
  and only then rewrites the header with the bit clear, and flushes again;
- a read-write open of a dirty image repairs it (check, fix all) before any write; a
  read-only open reads guest data and leaves the bit set.

Guest-data ordering that QEMU leaves to chance but the crash contract demands:
data written into a cluster that may hold stale bytes (anything below the current end
of the host file) is flushed before the L2 entry that exposes it, so a crash never
shows another sector's old data there.
"""

from __future__ import annotations

import itertools
import struct
from typing import Callable

from models.blockio import BlockFile, CacheMode, WriteSite, read_exact
from models.qcow2 import inject, spec
from models.qcow2.cache import TableCache
from models.qcow2.entries import ClusterType, get_entry, l2_cluster_type, set_entry
from models.qcow2.errors import (CorruptImage, HostIOError, ImageDead, ImageNotWritable, InvalidRequest, MetadataOverlap,
                                 RepairFailed, UnsupportedFeature)
from models.qcow2.geometry import Geometry
from models.qcow2.header import ParsedHeader, cluster0_bytes, read_header
from models.qcow2.overlap import OL_NAMES, OverlapGuard, c_hex, corruption_event, forget_failed_writeback, swallowed
from models.qcow2.refcount import Refcounts
from models.qcow2.structs import FIELD_OFFSET, Header


def _pow2_log(value: int, field: str, lo: int, hi: int) -> int:
    if value <= 0 or value & (value - 1) or not lo <= value.bit_length() - 1 <= hi:
        raise InvalidRequest(f"{field} = {value}: must be a power of two between {1 << lo} and {1 << hi}")
    return value.bit_length() - 1


class Qcow2Image:
    """An open qcow2 image over a BlockFile."""

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
        self._unflushed = False
        self.dirty = bool(self.hdr.incompatible_features & spec.IncompatFeature.DIRTY)
        header_lazy = bool(self.hdr.compatible_features & spec.CompatFeature.LAZY_REFCOUNTS)
        self.lazy = header_lazy if lazy_refcounts is None else lazy_refcounts
        if self.lazy and self.hdr.version < 3:
            raise InvalidRequest(f"{self.path}: Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
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
             log: Callable[[str], None] | None = None) -> "Qcow2Image":
        """Open and validate; a read-write open of a dirty image repairs it first (unless check_mode)."""
        parsed = read_header(file, writable=not readonly, check_mode=check_mode)
        if not readonly and not check_mode and parsed.header.incompatible_features & spec.IncompatFeature.DIRTY:
            _repair_dirty(file, log)
            parsed = read_header(file, writable=True)
        img = cls(file, parsed, readonly=readonly, cache_mode=CacheMode(cache_mode), lazy_refcounts=lazy_refcounts, log=log)
        if not check_mode:
            img.overlap.load_snapshots()  # qcow2_read_snapshots: QEMU's open refuses a table it cannot read
        if not readonly and img.hdr.version >= 3 and img.hdr.autoclear_features & ~int(spec.AUTOCLEAR_MASK):
            img.hdr.autoclear_features &= int(spec.AUTOCLEAR_MASK)
            img._update_header()
            img._file_flush()
        if not readonly and img.dirty and not img.lazy:
            img._mark_clean()
        return img

    @classmethod
    def create(cls, file: BlockFile, size: int, *, version: int = 3, cluster_size: int = 65536,
               refcount_bits: int = 16, lazy_refcounts: bool = False) -> None:
        """Lay out a fresh image as `qemu-img create -f qcow2` does: header, reftable, refblock, L1."""
        if version not in (2, 3):
            raise InvalidRequest(f"{file.name}: compat/version {version}: must be 2 (0.10) or 3 (1.1)")
        cluster_bits = _pow2_log(cluster_size, "cluster_size", spec.MIN_CLUSTER_BITS, spec.MAX_CLUSTER_BITS)
        refcount_order = _pow2_log(refcount_bits, "refcount_bits", 0, spec.MAX_REFCOUNT_ORDER)
        if version == 2 and refcount_bits != 16:
            raise InvalidRequest(f"{file.name}: refcount_bits = {refcount_bits}: version 2 images require 16-bit refcounts")
        if lazy_refcounts and version < 3:
            raise InvalidRequest(f"{file.name}: lazy_refcounts=on: Lazy refcounts only supported with compatibility level 1.1 and above")
        if size < 0:
            raise InvalidRequest(f"{file.name}: size = {size}: must not be negative")
        size = (size + 511) // 512 * 512
        geo = Geometry(cluster_bits, refcount_order)
        if geo.size_to_l1(size) * 8 > spec.QCOW_MAX_L1_SIZE:
            raise InvalidRequest(f"{file.name}: size = {size}: the L1 table would exceed {spec.QCOW_MAX_L1_SIZE} bytes")
        cs = geo.cluster_size
        hdr = Header(version=version, cluster_bits=cluster_bits, refcount_table_offset=cs, refcount_table_clusters=1,
                     compatible_features=int(spec.CompatFeature.LAZY_REFCOUNTS) if lazy_refcounts else 0,
                     refcount_order=refcount_order if version >= 3 else 4,
                     header_length=spec.V3_HEADER_LENGTH if version >= 3 else spec.V2_HEADER_LENGTH)
        file.truncate(0)
        file.pwrite(0, cluster0_bytes(hdr, []), WriteSite.CREATE)
        file.pwrite(cs, (2 * cs).to_bytes(8, "big") + bytes(cs - 8), WriteSite.CREATE)
        file.pwrite(2 * cs, bytes(cs), WriteSite.CREATE)
        parsed = read_header(file, writable=True)
        img = cls(file, parsed, readonly=False, cache_mode=CacheMode.WRITEBACK, lazy_refcounts=False, log=None)
        first = img.alloc_clusters(3)
        assert first == 0, f"fresh image allocated its first clusters at {first:#x}"
        l1_size = geo.size_to_l1(size)
        if l1_size:
            l1_off = img.alloc_clusters(geo.size_to_clusters(l1_size * 8))
            img.refcache.flush()
            img._pwrite(l1_off, bytes(l1_size * 8), WriteSite.L1)
            img.hdr.l1_table_offset, img.hdr.l1_size = l1_off, l1_size
            img.l1 = [0] * l1_size
        img.hdr.size = size
        img.refcache.flush()
        img._update_header()
        img._file_flush()
        img.closed = True

    def _read_table(self, offset: int, length: int) -> bytes:
        return read_exact(self.file, offset, length)

    def _load_tables(self) -> None:
        hdr = self.hdr
        self.l1 = _unpack_u64s(read_exact(self.file, hdr.l1_table_offset, hdr.l1_size * 8)) if hdr.l1_size else []
        self.reftable_offset = hdr.refcount_table_offset
        n = hdr.refcount_table_clusters * self.geo.cluster_size // 8
        self.reftable = _unpack_u64s(read_exact(self.file, self.reftable_offset, n * 8)) if n else []

    # ---- the one write choke point ------------------------------------------------------------
    def _pwrite(self, offset: int, data: bytes, site: WriteSite) -> None:
        if self.readonly:
            raise ImageNotWritable(f"{self.path}: write at offset {offset:#x} ({site}) on an image opened read-only")
        if self.dead:
            raise ImageDead(f"{self.path}: write at offset {offset:#x} ({site}): No medium found (the image was marked corrupt)")
        hit = self.overlap.check(offset, len(data), site)
        if hit is not None:
            self._signal_corruption(offset, site, hit)
        try:
            self.file.pwrite(offset, data, site)
        except HostIOError:
            if not swallowed(site):  # injected error-handling bugs only
                raise
        self._unflushed = True
        self.overlap.after_write(site)

    def _signal_corruption(self, offset: int, site: WriteSite, hit: str) -> None:
        """A write would land on metadata: a fatal corruption event, and the request fails (EIO)."""
        rule = f"Preventing invalid write on metadata (overlaps with {OL_NAMES[hit]})"
        corruption_event(self, rule)
        raise MetadataOverlap(self.path, offset, f"{site} write", offset, rule)

    def _file_flush(self) -> None:
        # Like the block layer's flushed_gen: no host flush when nothing was written since the last.
        if self._unflushed:
            self.file.flush()
            self._unflushed = False
        if not self.l2cache.dirty:
            self.refcounts.release_recently_freed()

    def _host_size(self) -> int:
        return self.file.size()

    def _update_header(self) -> None:
        self._pwrite(0, cluster0_bytes(self.hdr, self.extensions), WriteSite.HEADER)

    def _switch_reftable(self, offset: int, clusters: int) -> None:
        self.hdr.refcount_table_offset, self.hdr.refcount_table_clusters = offset, clusters
        start, raw = self.hdr.field_bytes("refcount_table_offset", "refcount_table_clusters")
        self._pwrite(start, raw, WriteSite.REFTABLE_SWITCH)
        self._file_flush()
        self.reftable_offset = offset
        self.overlap.invalidate()

    # ---- dirty bit ---------------------------------------------------------------------------
    def _need_accurate_refcounts(self) -> bool:
        return not self.dirty

    def _mark_dirty(self) -> None:
        if self.dirty:
            return
        incompat = self.hdr.incompatible_features | spec.IncompatFeature.DIRTY
        self._pwrite(FIELD_OFFSET["incompatible_features"], int(incompat).to_bytes(8, "big"), WriteSite.DIRTY_BIT)
        if not inject.on("dirty-no-flush"):
            self._file_flush()
        self.hdr.incompatible_features = int(incompat)
        self.dirty = True

    def _mark_clean(self) -> None:
        """Write every table, flush, then clear the bit: never clear it over refcounts still wrong on disk."""
        if not self.dirty:
            return
        if inject.on("dirty-not-cleared"):
            self._write_caches(force_refcounts=True)
            self._file_flush()
            return
        if inject.on("eio-dirty-cleared-after-failed-flush"):
            forget_failed_writeback(self)
        if inject.on("dirty-cleared-early"):
            self.hdr.incompatible_features &= ~int(spec.IncompatFeature.DIRTY)
            self._update_header()
            self._file_flush()
        self.dirty = False
        self._write_caches(force_refcounts=True)
        self._file_flush()
        self.hdr.incompatible_features &= ~int(spec.IncompatFeature.DIRTY)
        self._update_header()
        self._file_flush()

    # ---- guest mapping ---------------------------------------------------------------------
    def _check_request(self, offset: int, length: int, what: str) -> None:
        if self.closed:
            raise InvalidRequest(f"{self.path}: {what} on a closed image")
        if self.dead:
            raise ImageDead(f"{self.path}: {what}: No medium found (the image was marked corrupt)")
        if offset < 0 or length < 0 or offset + length > self.hdr.size:
            raise InvalidRequest(
                f"{self.path}: {what} offset={offset} length={length}: must lie within the virtual size {self.hdr.size}")

    def _l2_table_offset(self, l1_index: int) -> int:
        l1e = self.l1[l1_index]
        l2_off = l1e & spec.L1E_OFFSET_MASK
        if l2_off and not self.geo.is_aligned(l2_off):
            corruption_event(self, f"L2 table offset {c_hex(l2_off)} unaligned (L1 index: {c_hex(l1_index)})")
            raise CorruptImage(self.path, self.hdr.l1_table_offset + 8 * l1_index, f"L1[{l1_index}]", l1e,
                               f"L2 table offset {l2_off:#x} not aligned to cluster size {self.geo.cluster_size:#x}")
        return l2_off

    def _lookup(self, guest: int) -> tuple[int, ClusterType, int]:
        """(L2 entry, its type, host cluster offset) for a guest offset."""
        l2_off = self._l2_table_offset(self.geo.offset_to_l1_index(guest))
        if not l2_off:
            return 0, ClusterType.UNALLOCATED, 0
        idx = self.geo.offset_to_l2_index(guest)
        entry = get_entry(self.l2cache.get(l2_off), idx)
        ctype = l2_cluster_type(entry, self.hdr.version)
        if ctype is ClusterType.COMPRESSED:
            raise UnsupportedFeature(self.path, l2_off + 8 * idx, f"L2 entry {idx}", ["compressed clusters"])
        host = entry & spec.L2E_OFFSET_MASK
        if host and not self.geo.is_aligned(host):
            corruption_event(self, f"Cluster allocation offset {c_hex(host)} unaligned (L2 offset: {c_hex(l2_off)}, "
                                   f"L2 index: {c_hex(idx)})")
            raise CorruptImage(self.path, l2_off + 8 * idx, f"L2 entry {idx}", entry,
                               f"data cluster offset {host:#x} not aligned to cluster size {self.geo.cluster_size:#x}")
        return entry, ctype, host

    def _chunks(self, offset: int, length: int):
        cs = self.geo.cluster_size
        pos, end = offset, offset + length
        while pos < end:
            in_off = self.geo.offset_into_cluster(pos)
            n = min(cs - in_off, end - pos)
            yield pos, in_off, n
            pos += n

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes: each L2 table's slice is decoded once, and host-contiguous clusters are read in one pread."""
        self._check_request(offset, length, "read")
        geo = self.geo
        cs, per_l2 = geo.cluster_size, geo.l2_entries
        out = bytearray(length)
        run = [0, 0, 0]  # host offset, position in out, length: the pending pread

        def flush_run() -> None:
            if run[2]:
                out[run[1] : run[1] + run[2]] = read_exact(self.file, run[0], run[2])

        pos, end = offset, offset + length
        while pos < end:
            idx = geo.offset_to_l2_index(pos)
            span_end = min(end, geo.start_of_cluster(pos) + (per_l2 - idx) * cs)  # the rest of this L2 table's range
            l2_off = self._l2_table_offset(geo.offset_to_l1_index(pos))
            if not l2_off:
                pos = span_end  # unallocated L2 table: zeros
                continue
            n = geo.size_to_clusters(span_end - geo.start_of_cluster(pos))
            for k, entry in enumerate(struct.unpack_from(f">{n}Q", self.l2cache.get(l2_off), idx * 8)):
                in_off = geo.offset_into_cluster(pos)
                chunk = min(cs - in_off, span_end - pos)
                host = self._read_host(entry, l2_off, idx + k)
                if host:
                    if run[2] and run[0] + run[2] == host + in_off and run[1] + run[2] == pos - offset:
                        run[2] += chunk
                    else:
                        flush_run()
                        run[:] = host + in_off, pos - offset, chunk
                pos += chunk
        flush_run()
        return bytes(out)

    def _read_host(self, entry: int, l2_off: int, idx: int) -> int:
        """The host cluster a read of this L2 entry returns data from, or 0 for zeros (as _lookup decides)."""
        if entry & spec.QCOW_OFLAG_COMPRESSED:
            raise UnsupportedFeature(self.path, l2_off + 8 * idx, f"L2 entry {idx}", ["compressed clusters"])
        host = entry & spec.L2E_OFFSET_MASK
        if not host:
            return 0
        if not self.geo.is_aligned(host):
            raise CorruptImage(self.path, l2_off + 8 * idx, f"L2 entry {idx}", entry,
                               f"data cluster offset {host:#x} not aligned to cluster size {self.geo.cluster_size:#x}")
        if self.hdr.version >= 3 and entry & spec.QCOW_OFLAG_ZERO and not inject.on("stale-l2-entry-read"):
            return 0  # ZERO_ALLOC reads as zeros
        return host

    def is_allocated(self, guest: int) -> bool:
        """Whether the guest cluster holding `guest` maps to a data cluster (for judging foreign data)."""
        return self._lookup(guest)[1] is ClusterType.NORMAL

    def allocated_guest_clusters(self) -> list[int]:
        """Guest offsets of every cluster that maps to host data (NORMAL entries), in guest order."""
        out = []
        cs, per_l2 = self.geo.cluster_size, self.geo.l2_entries
        for i in range(len(self.l1)):
            l2_off = self._l2_table_offset(i)
            if not l2_off:
                continue
            entries = struct.unpack(f">{per_l2}Q", self.l2cache.get(l2_off))
            for j in itertools.compress(range(per_l2), entries):
                if l2_cluster_type(entries[j], self.hdr.version) is ClusterType.NORMAL:
                    guest = (i * per_l2 + j) * cs
                    if guest < self.hdr.size:
                        out.append(guest)
        return out

    def _l2_for_write(self, guest: int) -> tuple[int, bytearray]:
        """The L2 table for a guest offset, allocating it (R F L2 F L1 F, as QEMU's l2_allocate) if missing."""
        l1_index = self.geo.offset_to_l1_index(guest)
        l2_off = self._l2_table_offset(l1_index)
        if l2_off and self.l1[l1_index] & spec.QCOW_OFLAG_COPIED:
            return l2_off, self.l2cache.get(l2_off)
        old = bytes(self.l2cache.get(l2_off)) if l2_off else None
        new_off = self.alloc_clusters(1)
        if new_off == 0:  # as QEMU's l2_allocate, before anything is written: the refcounts are broken
            corruption_event(self, "Preventing invalid allocation of L2 table at offset 0")
            raise CorruptImage(self.path, 0, "L2 table allocation", 0, "Preventing invalid allocation of L2 table at offset 0")
        self.refcache.flush()  # the new table is counted on disk before anything points at it
        table = self.l2cache.get_empty(new_off)
        if old is not None:
            table[:] = old
        self._pwrite(new_off, bytes(table), WriteSite.L2_ALLOC)
        if not inject.on("l2-alloc-no-flush"):
            self._file_flush()
        # As QEMU's l2_allocate: the in-memory L1 changes only once the entry is on disk (a failed write keeps the old).
        entry = new_off | spec.QCOW_OFLAG_COPIED
        self._pwrite(self.hdr.l1_table_offset + 8 * l1_index, entry.to_bytes(8, "big"), WriteSite.L1)
        self.l1[l1_index] = entry
        self.overlap.invalidate()
        self._file_flush()
        if old is not None:
            self.free_cluster(l2_off)
        return new_off, table

    def _link_l2(self, l2_off: int, table: bytearray, idx: int, entry: int, *, stale: bool, allocating: bool) -> None:
        """Point an L2 entry at a cluster whose data has been written (QEMU's qcow2_alloc_cluster_link_l2)."""
        if stale and not inject.on("data-after-l2"):
            self.l2cache.depends_on_flush = True
        if allocating and self.lazy and not inject.on("dirty-set-late"):
            self._mark_dirty()
        # Injected dirty-set-late: the L2 table is treated as lazy (no wait for the refcount
        # block) and written before the dirty bit.
        late = allocating and self.lazy and inject.on("dirty-set-late")
        if allocating and self._need_accurate_refcounts() and not inject.on("l2-before-refblock") and not late:
            self.l2cache.set_dependency(self.refcache)
        set_entry(table, idx, entry)
        self.l2cache.mark_dirty(l2_off)
        if late:
            self.l2cache.write()
            self._mark_dirty()

    def write(self, offset: int, data: bytes) -> None:
        self._check_request(offset, len(data), "write")
        self._require_writable("write")
        view = memoryview(data)
        done = 0
        first_l1 = self.geo.offset_to_l1_index(offset)
        for pos, in_off, n in self._chunks(offset, len(data)):
            if inject.on("l2-crossing-write-one-table") and self.geo.offset_to_l1_index(pos) != first_l1:
                # Injected: no per-L2-table clamp; the first table's wrapped-around index maps the cluster.
                pos -= (self.geo.offset_to_l1_index(pos) - first_l1) * self.geo.l2_entries * self.geo.cluster_size
            self._write_cluster(pos, in_off, view[done : done + n])
            done += n
        self._after_write()

    def _write_cluster(self, guest: int, in_off: int, chunk: memoryview) -> None:
        cs = self.geo.cluster_size
        entry, ctype, host = self._lookup(guest)
        if ctype is ClusterType.NORMAL and entry & spec.QCOW_OFLAG_COPIED:
            self._pwrite(host + in_off, bytes(chunk), WriteSite.DATA)
            return
        l2_off, table = self._l2_for_write(guest)
        idx = self.geo.offset_to_l2_index(guest)
        if ctype is ClusterType.NORMAL:
            # Shared cluster (no COPIED): copy it out before writing (never happens without snapshots).
            buf = bytearray(read_exact(self.file, host, cs))
        else:
            buf = bytearray(cs)
        buf[in_off : in_off + len(chunk)] = chunk
        reuse = ctype is ClusterType.ZERO_ALLOC and entry & spec.QCOW_OFLAG_COPIED
        new_host = host if reuse else self.alloc_clusters(1)
        # A copy of a shared cluster holds other sectors' data: it must be durable before the
        # L2 entry that exposes it (QEMU: l2 cache depends_on_flush after a COW), like reuse.
        stale = new_host < self.file.size() or ctype is ClusterType.NORMAL
        self._pwrite(new_host, bytes(buf), WriteSite.DATA)
        copied = 0 if inject.on("copied-flag-wrong") else spec.QCOW_OFLAG_COPIED
        self._link_l2(l2_off, table, idx, new_host | copied, stale=stale, allocating=not reuse)
        if host and not reuse:
            self.free_cluster(host)

    def write_zeroes(self, offset: int, length: int) -> None:
        """v3: whole clusters get the zero flag (allocation kept); partial clusters and v2 write zero bytes."""
        self._check_request(offset, length, "write_zeroes")
        self._require_writable("write_zeroes")
        cs = self.geo.cluster_size
        for pos, in_off, n in self._chunks(offset, length):
            if self.hdr.version < 3 or n != cs:
                self._write_cluster(pos, in_off, memoryview(bytes(n)))
                continue
            entry, ctype, host = self._lookup(pos)
            if ctype is ClusterType.ZERO_PLAIN or (ctype is ClusterType.ZERO_ALLOC):
                continue
            l2_off, table = self._l2_for_write(pos)
            new = spec.QCOW_OFLAG_ZERO
            if ctype is ClusterType.NORMAL:
                # Keep the cluster (QEMU without MAY_UNMAP); a shared one stays shared, without COPIED.
                new |= host | (entry & spec.QCOW_OFLAG_COPIED)
            set_entry(table, self.geo.offset_to_l2_index(pos), new)
            self.l2cache.mark_dirty(l2_off)
        self._after_write()

    def discard(self, offset: int, length: int) -> None:
        """Whole clusters inside the range become unallocated (v2) or zero (v3); partial clusters are left alone."""
        self._check_request(offset, length, "discard")
        self._require_writable("discard")
        cs = self.geo.cluster_size
        for pos, in_off, n in self._chunks(offset, length):
            # A partial last cluster of the disk counts as whole when the request reaches the end (as QEMU).
            whole_tail = in_off == 0 or inject.on("discard-tail-whole-cluster")
            if n != cs and not (whole_tail and pos + n == self.hdr.size):
                continue
            l2_off = self._l2_table_offset(self.geo.offset_to_l1_index(pos))
            if not l2_off:
                continue
            entry, ctype, host = self._lookup(pos)
            if ctype in (ClusterType.UNALLOCATED, ClusterType.ZERO_PLAIN):
                continue
            l2_off, table = self._l2_for_write(pos)  # a table shared with a snapshot is copied first
            set_entry(table, self.geo.offset_to_l2_index(pos), spec.QCOW_OFLAG_ZERO if self.hdr.version >= 3 else 0)
            self.l2cache.mark_dirty(l2_off)
            self.free_cluster(host)

    def _after_write(self) -> None:
        if self.cache_mode.flushes_writes and not inject.on("writethrough-no-flush"):
            self.flush()

    def _require_writable(self, what: str) -> None:
        if self.readonly:
            raise ImageNotWritable(f"{self.path}: {what}: image opened read-only")

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
            self._mark_clean()
        self.lazy = on

    def close(self) -> None:
        if self.closed:
            return
        if not self.readonly and not self.dead:
            if self.dirty:
                self._mark_clean()
            else:
                self._write_caches(force_refcounts=True)
                self._file_flush()
        self.closed = True

    def abort(self) -> None:
        """Stop at once, as after a crash: no cache write-back, no flush, no header update."""
        self.closed = True

    def __enter__(self) -> "Qcow2Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        return self.hdr.size


def _unpack_u64s(raw: bytes) -> list[int]:
    return list(struct.unpack(f">{len(raw) // 8}Q", raw[: len(raw) // 8 * 8]))


def _repair_dirty(file: BlockFile, log: Callable[[str], None] | None) -> None:
    """Repair a dirty image before its first write (QEMU: check with FIX_ERRORS | FIX_LEAKS on open)."""
    from models.qcow2 import check as checkmod

    if inject.on("repair-leaks-only"):
        result = checkmod.check(file, checkmod.Fix.LEAKS)
        checkmod.clear_dirty_bit(file)
        return
    result = checkmod.repair(file, checkmod.Fix.ALL)
    if log:
        for line in result.messages:
            log(line)
    if result.check_errors or result.corruptions:
        raise RepairFailed(f"{file.name}: Could not repair dirty image: {result.check_errors} check errors, "
                           f"{result.corruptions} corruptions remain")
