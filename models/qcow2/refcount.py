"""Refcount table and blocks: cluster allocation and freeing, refcount-block allocation, refcount-table growth (qcow2-refcount.c).

Hazards this module guards against, each ordered before the write that would expose it:

- a new refcount block is written and flushed before the refcount-table entry that
  points at it; a block that lives in another block's range is counted there, and
  that count is flushed, before the hookup;
- a grown refcount table and its new blocks are flushed before the header switches
  to them, and the old table is freed only after the switch is durable;
- a freed cluster is not handed out again until the L2 update that freed it is
  durable (`recently_freed`), or a crash could show the new owner's data through
  the old L2 entry.
"""

from __future__ import annotations

from typing import MutableSequence, Protocol

from models.blockio import WriteSite
from models.qcow2 import inject, spec
from models.qcow2.cache import TableCache
from models.qcow2.errors import CorruptImage
from models.qcow2.freesearch import find_free
from models.qcow2.geometry import Geometry, get_refcount, set_refcount
from models.qcow2.hostio import HostIO


class RefcountHost(Protocol):
    """What the refcount code needs from the image it serves: its tables, its one write choke point and its host I/O."""

    geo: Geometry
    path: str
    refcache: TableCache
    l2cache: TableCache
    reftable: MutableSequence[int]  # an array.array once read from disk, a list once grown
    reftable_offset: int

    def _pwrite(self, offset: int, data: bytes, site: WriteSite) -> None: ...

    def _file_flush(self) -> None: ...

    io: HostIO


class Refcounts:
    """Cluster allocation and freeing for one image; owns the allocation cursor and the recently freed clusters."""

    def __init__(self, host: RefcountHost) -> None:
        self.host = host
        self.geo = host.geo
        self.refcache = host.refcache
        self.l2cache = host.l2cache
        self.free_cluster_index = 0
        self.recently_freed: set[int] = set()
        self.reserved: tuple[int, int] = (0, 0)  # [start, end) of the range alloc_clusters is placing

    @property
    def reftable(self) -> MutableSequence[int]:
        return self.host.reftable

    @reftable.setter
    def reftable(self, table: MutableSequence[int]) -> None:
        self.host.reftable = table

    # -- lookups ----------------------------------------------------------------------------
    def refcount(self, cluster: int) -> int:
        ri = self.geo.reftable_index(cluster)
        if ri >= len(self.reftable):
            return 0
        block_off = self.reftable[ri] & spec.REFT_OFFSET_MASK
        if not block_off:
            return 0
        return get_refcount(self.refcache.get(block_off), self.geo.refblock_index(cluster), self.geo.refcount_order)

    def _has_refblock(self, ri: int) -> bool:
        return ri < len(self.reftable) and bool(self.reftable[ri] & spec.REFT_OFFSET_MASK)

    # -- allocation -------------------------------------------------------------------------
    def alloc_clusters(self, n: int = 1) -> int:
        """Allocate `n` contiguous clusters (refcounts raised in the cache); return the host offset."""
        while True:
            start = find_free(self, n)
            hint = self.free_cluster_index
            # As QEMU's alloc_clusters_noref: the hint moves past the range first, so refcount
            # blocks made for the range land after it.
            self.free_cluster_index = start + n
            # Refcount blocks made for the range (and any table growth) must not land inside it.
            self.reserved = (start, start + n)
            try:
                self._ensure_refblocks(start, n)
            finally:
                self.reserved = (0, 0)
            if not (self.refcount(start) if n == 1 else any(self.refcount(c) for c in range(start, start + n))):
                break
            self.free_cluster_index = hint  # the range was taken after all: search again
        for c in range(start, start + n):
            self._update_refcount(c, +1)
        return self.geo.cluster_to_offset(start)

    def _ensure_refblocks(self, start: int, n: int) -> None:
        ri = self.geo.reftable_index(start)
        while ri <= self.geo.reftable_index(start + n - 1):
            if self._has_refblock(ri):
                ri += 1
            else:
                self._alloc_refblock(ri, avoid_end=start + n)  # may allocate another range's block first

    def _alloc_refblock(self, ri: int, avoid_end: int = 0) -> None:
        if ri >= len(self.reftable):
            self._grow_reftable(ri, avoid_end)
            return
        c = find_free(self, 1)
        home = self.geo.reftable_index(c)
        block_off = self.geo.cluster_to_offset(c)
        if home == ri:
            # Self-describing: the new block counts itself.
            block = self.refcache.get_empty(block_off)
            if not inject.on("refblock-not-self-described"):
                set_refcount(block, self.geo.refblock_index(c), self.geo.refcount_order, 1)
            self.host._pwrite(block_off, bytes(block), WriteSite.REFBLOCK_ALLOC)
            if not inject.on("refblock-alloc-no-flush"):
                self.host._file_flush()
        else:
            if not self._has_refblock(home):
                self._alloc_refblock(home, avoid_end)
                return  # the caller searches again: free space changed
            self._update_refcount(c, +1)
            block = self.refcache.get_empty(block_off)
            self.host._pwrite(block_off, bytes(block), WriteSite.REFBLOCK_ALLOC)
            self.refcache.flush()  # the block's own count is durable before the hookup
        self.reftable[ri] = block_off
        self.host._pwrite(self.host.reftable_offset + ri * 8, block_off.to_bytes(8, "big"), WriteSite.REFTABLE)
        self.host._file_flush()

    def _grow_reftable(self, min_index: int, avoid_end: int = 0) -> None:
        """Place a larger refcount table and the blocks that count it past everything in use, then switch.

        `avoid_end`: the end of a range being allocated, so the new structures do not land
        inside it (which would move the range, and grow the table again).
        """
        geo = self.geo
        cs, rbe = geo.cluster_size, geo.refblock_entries
        old_entries = len(self.reftable)
        start = max(old_entries * rbe, geo.size_to_clusters(self.host.io.host_size()), avoid_end)
        new_entries = max(min_index + 1, old_entries * 2)
        while True:
            table_clusters = geo.size_to_clusters(new_entries * 8)
            nblocks = 0
            while True:
                end = start + nblocks + table_clusters
                first_ri, last_ri = start // rbe, (end - 1) // rbe
                if last_ri - first_ri + 1 == nblocks:
                    break
                nblocks = last_ri - first_ri + 1
            if last_ri < new_entries:
                break
            new_entries = last_ri + 1
        new_entries = table_clusters * cs // 8
        table_off = geo.cluster_to_offset(start + nblocks)
        new_table = list(self.reftable) + [0] * (new_entries - old_entries)
        if inject.on("reftable-grow-loses-entry"):
            new_table[old_entries - 1] = 0
        for k in range(nblocks):
            ri = first_ri + k
            block_off = geo.cluster_to_offset(start + k)
            block = self.refcache.get_empty(block_off)
            for c in range(max(start, ri * rbe), min(end, (ri + 1) * rbe)):
                set_refcount(block, geo.refblock_index(c), geo.refcount_order, 1)
            self.host._pwrite(block_off, bytes(block), WriteSite.REFBLOCK_ALLOC)
            new_table[ri] = block_off
        raw = b"".join(e.to_bytes(8, "big") for e in new_table)
        self.host._pwrite(table_off, raw, WriteSite.REFTABLE_GROW)
        self.host._file_flush()
        old_off, old_clusters = self.host.reftable_offset, geo.size_to_clusters(old_entries * 8)
        self.reftable = new_table
        self.host.io.switch_reftable(table_off, table_clusters)
        for c in range(geo.offset_to_cluster(old_off), geo.offset_to_cluster(old_off) + old_clusters):
            self._update_refcount(c, -1)

    def _update_refcount(self, cluster: int, delta: int) -> None:
        geo = self.geo
        target = cluster + 1 if inject.on("refcount-index-off-by-one") and delta > 0 else cluster
        ri = geo.reftable_index(target)
        block_off = self.reftable[ri] & spec.REFT_OFFSET_MASK if ri < len(self.reftable) else 0
        if not block_off:
            raise CorruptImage(self.host.path, None, f"refcount table entry {ri}", 0,
                               f"no refcount block covers cluster {target} while updating its refcount")
        block = self.refcache.get(block_off)
        idx = geo.refblock_index(target)
        value = get_refcount(block, idx, geo.refcount_order) + delta
        if not 0 <= value <= geo.refcount_max:
            raise CorruptImage(self.host.path, block_off, f"refcount of cluster {target}", value - delta,
                               f"Invalid refcount: {value - delta}{delta:+d} leaves 0..{geo.refcount_max}")
        set_refcount(block, idx, geo.refcount_order, value)
        self.refcache.mark_dirty(block_off)
        if value == 0:
            if inject.on("reuse-before-free-durable"):
                self.free_cluster_index = min(self.free_cluster_index, target)
            else:
                self.recently_freed.add(target)

    def free_cluster(self, host_offset: int) -> None:
        """Drop one reference; the refcount block is written only after the L2 change that freed it."""
        if not inject.on("refcount-free-early"):
            self.refcache.set_dependency(self.l2cache)
        self._update_refcount(self.geo.offset_to_cluster(host_offset), -1)
        if inject.on("refcount-free-early"):
            self.refcache.write()

    def release_recently_freed(self) -> None:
        """Called once the L2 updates that freed clusters are durable: they may be reused now."""
        if self.recently_freed:
            self.free_cluster_index = min(self.free_cluster_index, min(self.recently_freed))
            self.recently_freed.clear()
