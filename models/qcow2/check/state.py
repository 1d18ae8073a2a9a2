"""The image a check runs on (QEMU's BDRVQcow2State opened with BDRV_O_CHECK): tables, refcount-block cache, corruption events.

Built from the header that `models.qcow2.header.read_header` has already parsed and
validated, as QEMU's qcow2_check_refcounts takes the open driver state; the check adds
only the refusals of what it does not implement.
"""

from __future__ import annotations

import collections
import errno
import os
from typing import Callable, MutableSequence

from models.blockio import BlockFile, WriteSite, read_exact
from models.qcow2 import inject, spec
from models.qcow2.cache import TableCache
from models.qcow2.check.imrt import PackedView, as_u64_table, decode_refblock, nonzero_entries, refblock_view
from models.qcow2.check.result import CheckCounts, Finding, Kind
from models.qcow2.errors import UnsupportedFeature
from models.qcow2.geometry import set_refcount
from models.qcow2.header import ParsedHeader
from models.qcow2.snaptable import Snapshot
from models.qcow2.structs import FIELD_OFFSET

__all__ = ["BDRV_MAX_LENGTH", "CheckState", "CheckFailed", "RefcountIOError", "hash_x", "l1_bytes_in_file"]

_INCOMPAT = FIELD_OFFSET["incompatible_features"]
_REFT_OFFSET_MASK = spec.REFT_OFFSET_MASK
# QEMU's BDRV_MAX_LENGTH: any request ending past it fails with EIO ("offset(...) exceeds maximum(...)").
BDRV_MAX_LENGTH = (1 << 63) - (1 << 30)


class CheckFailed(Exception):
    """The check stops with a negative errno (QEMU: `goto fail` with ret < 0)."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


class RefcountIOError(Exception):
    """qcow2_get_refcount() failed (-EIO for an unaligned refblock offset)."""


def l1_bytes_in_file(file_size: int, l1_offset: int, l1_size: int) -> int:
    """How many bytes of an L1 table of `l1_size` entries at `l1_offset` lie inside the file (whole entries)."""
    return max(0, min(l1_size * 8, file_size - l1_offset)) // 8 * 8


def cluster_runs(clusters: list[int]) -> tuple[tuple[int, int], ...]:
    """Ascending clusters as (first, count) runs of consecutive ones (what discard_clusters takes)."""
    out: list[list[int]] = []
    for c in clusters:
        if out and out[-1][0] + out[-1][1] == c:
            out[-1][1] += 1
        else:
            out.append([c, 1])
    return tuple((a, n) for a, n in out)


def hash_x(value: int) -> str:
    """C's "%#" PRIx64: 0 prints as "0", anything else with a 0x prefix."""
    return f"{value:#x}" if value else "0"


def _refuse_unimplemented(path: str, parsed: ParsedHeader) -> None:
    """What read_header accepts but the check does not implement: persistent dirty bitmaps."""
    if parsed.header.autoclear_features & spec.BITMAPS_BIT:
        for ext in parsed.extensions:
            if ext.type == spec.EXT_BITMAPS:
                raise UnsupportedFeature(path, ext.offset, "header extension", ["bitmaps"], "not implemented by qcrash's check")


class CheckState:
    """One opened image and the bookkeeping of the check running on it."""

    def __init__(self, file: BlockFile, path: str, parsed: ParsedHeader, findings: list[Finding],
                 max_growth: int | None = None) -> None:
        _refuse_unimplemented(path, parsed)
        hdr = parsed.header
        self.file = file
        self.path = path
        self.hdr = hdr
        self.geo = parsed.geometry
        self.cs = self.geo.cluster_size
        self.order = hdr.refcount_order
        self.rb_entries = self.geo.refblock_entries
        self.refcount_max = self.geo.refcount_max
        self.findings = findings
        self.max_growth = max_growth
        self.writable = False
        self.signaled_corruption = False
        self.drv_dead = False  # QEMU sets bs->drv = NULL after a fatal corruption event
        self.corrupt_bit = bool(hdr.incompatible_features & spec.CORRUPT_BIT)
        rt_entries = hdr.refcount_table_clusters * self.cs // 8
        self.reftable_offset = hdr.refcount_table_offset
        # An array of u64, decoded in C: with 2 MiB clusters one reftable cluster holds 262,144 entries.
        self.reftable: MutableSequence[int] = decode_refblock(read_exact(file, self.reftable_offset, rt_entries * 8), 6)
        self.l1_offset = hdr.l1_table_offset
        self.l1_size = hdr.l1_size
        # Only the part of the L1 table inside the file is decoded (the rest reads as zeros:
        # no L2 table), in C: a hostile header can claim 4M entries beyond the end of a tiny file.
        self.l1 = decode_refblock(read_exact(file, self.l1_offset, l1_bytes_in_file(file.size(), self.l1_offset, self.l1_size)), 6)
        # The snapshot table: each check run reads it first (models/qcow2/snapcheck.py).
        self.snapshots: list[Snapshot] = []
        self.snapshots_size = 0
        # The refcount-block cache (qcow2-cache.c): written back by flush_refblocks().
        self.refblocks = TableCache("refcount", self._read, self._write_refblock, self.cs, WriteSite.REPAIR,
                                    self.repair_flush)
        # Each cached block also decoded to one int per entry, for lookups in C speed; kept
        # in step with the cache by set_refcount() and drop_refblock().
        self._decoded: dict[int, MutableSequence[int]] = {}
        # The on-disk refcounts a dry compare pass diffed (clusters, array), for the fixing pass that
        # follows it with nothing written in between (refcounts.compare_refcounts(again=True)).
        self.compared_disk: tuple[int, object] | None = None
        self.generation = 0  # bumped whenever a cached block is dropped
        self.ol_cache: dict[str, set[int]] | None = None  # see overlap.metadata_clusters
        self.res = CheckCounts()
        self.rebuilt = False
        self.past_eof_clusters: set[int] = set()
        self.l2_budget = 0
        self.walk_memo = False  # whether the L2 walk uses models/qcow2/check/l2memo (set per calculate_refcounts)
        # A count's reads (offset, length, digest) while it is to be remembered (calcmemo), and the
        # reads a missed replay made first, for the count to take in order: (offset, length, bytes or error, digest).
        self.count_reads: list[tuple[int, int, int]] | None = None
        self.prefetched: collections.deque = collections.deque()
        self._used_for: object = None  # the reftable `_used` was computed for (see reftable_used)
        self._used: list[int] = []
        # Zeroed clusters not yet written (start, end): see discard_cluster.
        self._pending_zeros: list[int] = []

    # ---------------------------------------------------------------- reporting

    def emit(self, kind: Kind, template: str, *args: object, cluster: int | None = None,
             refcount: int | None = None, reference: int | None = None) -> None:
        """Record one stderr line; `template` is formatted with `args` only when printed."""
        self.findings.append(Finding(kind, cluster, refcount, reference, template, args))

    def signal_corruption(self, fatal: bool, message: str) -> None:
        """qcow2_signal_corruption(): fatal only on a writable node; marks the image corrupt."""
        fatal = fatal and self.writable
        if self.signaled_corruption and (not fatal or self.corrupt_bit):
            return
        if fatal:
            self.emit(Kind.CORRUPTION_SIGNAL, "qcow2: Marking image as corrupt: {}; further corruption events will be suppressed", message)
            self._mark_corrupt()
            self.drv_dead = True
        else:
            self.emit(Kind.CORRUPTION_SIGNAL, "qcow2: Image is corrupt: {}; further non-fatal corruption events will be suppressed", message)
        self.signaled_corruption = True

    def _mark_corrupt(self) -> None:
        self.write_pending_zeros()
        self.corrupt_bit = True
        if self.hdr.version < 3:
            return  # a v2 header has no feature bits to write
        incompat = int.from_bytes(read_exact(self.file, _INCOMPAT, 8), "big") | spec.IncompatFeature.CORRUPT
        self.file.pwrite(_INCOMPAT, int(incompat).to_bytes(8, "big"), WriteSite.REPAIR)
        self.file.flush()

    def fail(self, kind: Kind | None, message: str) -> CheckFailed:
        """A write the check needed was refused: print why, count a check error, stop with EIO."""
        if kind is not None:
            self.emit(kind, message)
        self.res.check_errors += 1
        return CheckFailed(errno.EIO)

    # ---------------------------------------------------------------- on-disk refcounts

    def _read(self, offset: int, length: int) -> bytes:
        self.write_pending_zeros()
        return read_exact(self.file, offset, length)

    def decoded_refblock(self, offset: int):
        view = self._decoded.get(offset)
        if view is None:
            view = self._decoded[offset] = refblock_view(self.refblocks.get(offset), self.order)
        return view

    def refblock_offset(self, index: int) -> int:
        """The refcount block offset of reftable entry `index` (0 when there is none); EIO when unaligned."""
        if index >= len(self.reftable):
            return 0
        offset = self.reftable[index] & spec.REFT_OFFSET_MASK
        if offset and not self.geo.is_aligned(offset):
            self.signal_corruption(True, f"Refblock offset {hash_x(offset)} unaligned (reftable index: {hash_x(index)})")
            raise RefcountIOError()
        if self.refblock_unreadable(offset):
            raise RefcountIOError()  # QEMU's read of the block fails with EIO, no corruption event
        return offset

    def reftable_used(self) -> list[int]:
        """Indices of the non-zero refcount-table entries, ascending (found in C; recomputed after a rebuild swaps the table)."""
        table = self.reftable
        if self._used_for is not table:
            self._used = nonzero_entries(as_u64_table(table))
            self._used_for = table
        return self._used

    def refblock_unreadable(self, offset: int) -> bool:
        """Whether a refcount block at `offset` ends past BDRV_MAX_LENGTH, where QEMU's read fails with EIO."""
        return offset + self.cs > BDRV_MAX_LENGTH

    def get_refcount(self, cluster: int) -> int:
        """qcow2_get_refcount(): the on-disk refcount, through the refcount-block cache."""
        offset = self.refblock_offset(self.geo.reftable_index(cluster))
        if not offset:
            return 0
        return self.decoded_refblock(offset)[self.geo.refblock_index(cluster)]

    def refcount_reader(self) -> Callable[[int], int]:
        """get_refcount() for a loop over ascending clusters: the current block's decoded view is kept between calls.

        The view is looked up again when the cluster leaves the block or when the cache
        dropped a block since (a repair freeing a cluster that is a cached refblock).
        """
        rbe = self.rb_entries
        current: list = [-1, None, -1]  # reftable index, decoded view, cache generation

        def read(cluster: int) -> int:
            index = cluster // rbe
            if index != current[0] or current[2] != self.generation:
                offset = self.refblock_offset(index)  # raises for an unaligned block, every time, as QEMU
                current[:] = index, (self.decoded_refblock(offset) if offset else None), self.generation
            view = current[1]
            return view[cluster - index * rbe] if view is not None else 0

        return read

    def set_refcount(self, cluster: int, value: int) -> None:
        """update_refcount() for one cluster whose refblock exists (the only case a fix needs)."""
        index, entry = divmod(cluster, self.rb_entries)
        offset = self.reftable[index] & _REFT_OFFSET_MASK
        view = self._decoded.get(offset)
        if view is None:
            view = self.decoded_refblock(offset)
        self._store(offset, view, ((entry, value),))
        if value == 0:
            freed = self.geo.cluster_to_offset(cluster)
            if freed != offset and freed in self.refblocks.tables:
                # A freed cluster that is itself a cached refblock is dropped from the cache unwritten.
                self.refblocks.drop(freed)
                self._decoded.pop(freed, None)
                self.generation += 1
            self.discard_cluster(freed)

    def _store(self, offset: int, view: MutableSequence[int], entries) -> None:
        """Write (index, value) entries into the cached refcount block at `offset` and its decoded `view`.

        A dirty image's repair sets hundreds of thousands of these: the common widths are
        written inline, not through geometry.set_refcount. (A decoded view exists only while
        its block is cached: both are dropped and cleared together.)
        """
        order = self.order
        if order == 3 or type(view) is PackedView:
            for index, value in entries:
                view[index] = value  # an 8-bit block's view is the cached block itself; a PackedView writes through
        else:
            block = self.refblocks.get(offset)
            for index, value in entries:
                view[index] = value
                if order == 4:
                    block[2 * index:2 * index + 2] = value.to_bytes(2, "big")
                else:
                    set_refcount(block, index, order, value)
        self.refblocks.mark_dirty(offset)

    def set_refcounts(self, offset: int, base: int, repairs: list[tuple[int, int]]) -> None:
        """set_refcount() for ascending clusters of the one refcount block at `offset` (first cluster `base`).

        The caller has made sure no cluster freed here is a cached refcount block other
        than this one (set_refcount would drop it from the cache): the entries are
        written, then the freed clusters discarded in ascending order, as one set_refcount
        after another would.
        """
        self._store(offset, self.decoded_refblock(offset), [(cluster - base, value) for cluster, value in repairs])
        cs = self.cs
        # (consecutive freed clusters discarded as one run: discard_clusters joins them into the
        # pending zero run exactly as one discard_cluster after another would, clipped alike)
        for first, count in cluster_runs([cluster for cluster, value in repairs if value == 0]):
            self.discard_clusters(first * cs, count)

    def replace_refblock(self, offset: int, data: bytes) -> None:
        """Set the cached refcount block at `offset` (and its decoded view) to `data`, marked dirty: a replayed repair."""
        block = self.refblocks.get(offset)
        block[:] = data
        view = self._decoded.get(offset)
        if view is not None and view is not block and type(view) is not PackedView:
            view[:] = decode_refblock(block, self.order)
        self.refblocks.mark_dirty(offset)

    def raw_refblock(self, offset: int) -> bytearray:
        return self.refblocks.get(offset)

    def discard_cluster(self, offset: int) -> None:
        """QCOW2_DISCARD_ALWAYS: qemu-img check punches a hole in a cluster whose refcount drops to 0.

        The block-file seam has no discard, so the hole is written as zeros (what a reader then
        sees). The cluster is referenced by nothing, so this is safe at any crash point.

        Adjacent zeroed clusters are written as one run, before anything else touches the
        file (`write_pending_zeros`). QEMU issues one discard per cluster here, but a discard
        of unreferenced clusters has no crash state a run lacks (the crash states tear a
        run at sector granularity), and one write per cluster made a dirty 512-byte-cluster
        repair log a million writes that every crash of the recovery replayed. Hazard:
        every other access the check makes while a run is pending must write it first; the
        check reads and writes through `_read`, `_write_refblock`, `_mark_corrupt` and, after
        compare_refcounts, anything (which writes the run before returning).
        """
        self.discard_clusters(offset, 1)

    def discard_clusters(self, offset: int, count: int) -> None:
        """discard_cluster for `count` consecutive clusters from `offset`, in one step (clipped to the file)."""
        size = self.file.size()
        if offset >= size:
            return
        end = min(offset + count * self.cs, size)
        pending = self._pending_zeros
        if pending and pending[1] == offset:
            pending[1] = end
            return
        self.write_pending_zeros()
        pending[:] = offset, end

    def write_pending_zeros(self) -> None:
        """Write the pending run of zeroed clusters (see discard_cluster)."""
        pending = self._pending_zeros
        if pending:
            start, end = pending
            pending.clear()
            self.file.pwrite(start, bytes(end - start), WriteSite.REPAIR)

    def _write_refblock(self, offset: int, data: bytes, site: WriteSite) -> None:
        from models.qcow2.check.overlap import pre_write_overlap_check

        self.write_pending_zeros()
        if not pre_write_overlap_check(self, offset, self.cs, frozenset({"refblock"})):
            raise self.fail(Kind.WRITE_FAILED, "ERROR: Could not write refcount block; metadata overlap check failed: Input/output error")
        self.file.pwrite(offset, data, site)

    def flush_refblocks(self) -> None:
        """Write back the dirty refcount blocks (qcow2_cache_flush), then flush the file."""
        if self.refblocks.dirty:
            self.refblocks.flush()

    def drop_refblocks(self) -> None:
        self.refblocks.clear()
        self._decoded.clear()
        self.generation += 1

    def release(self) -> None:
        """Break the state <-> refcount-block cache cycle (the cache calls back into the state) once the check is over.

        Without this every check leaves a cycle holding its file until the cyclic
        collector runs, which counts objects, not bytes: with 2 MiB clusters a sweep then
        holds dozens of dead image copies.
        """
        cache = self.refblocks
        cache.clear()
        cache.read = cache.write_fn = cache.file_flush = _released  # type: ignore[assignment]
        self._decoded.clear()

    def repair_flush(self) -> None:
        # Injected bug: "flush once at the end" leaves the switched header, the new
        # structures and the cleared dirty bit in one epoch, in any order after a crash.
        if not inject.on("rebuild-switch-before-durable"):
            self.file.flush()


def _released(*_args: object) -> None:
    raise RuntimeError("check state used after release()")
