"""The guest write path: L2 table allocation, cluster allocation and COW, and linking new clusters into L2 (qcow2-cluster.c).

Guest-data ordering that QEMU leaves to chance but the crash contract demands:
data written into a cluster that may hold stale bytes (anything below the current end
of the host file) is flushed before the L2 entry that exposes it, so a crash never
shows another sector's old data there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.blockio import WriteSite, read_exact
from models.qcow2 import inject, spec
from models.qcow2.dirty import mark_dirty
from models.qcow2.entries import ClusterType, set_entry
from models.qcow2.errors import CorruptImage
from models.qcow2.guestmap import chunks, l2_table_offset, lookup
from models.qcow2.overlap import corruption_event

if TYPE_CHECKING:
    from models.qcow2.image import Qcow2Image


def l2_for_write(img: "Qcow2Image", guest: int) -> tuple[int, bytearray]:
    """The L2 table for a guest offset, allocating it (R F L2 F L1 F, as QEMU's l2_allocate) if missing."""
    l1_index = img.geo.offset_to_l1_index(guest)
    l2_off = l2_table_offset(img, l1_index)
    if l2_off and img.l1[l1_index] & spec.QCOW_OFLAG_COPIED:
        return l2_off, img.l2cache.get(l2_off)
    old = bytes(img.l2cache.get(l2_off)) if l2_off else None
    new_off = img.alloc_clusters(1)
    if new_off == 0:  # as QEMU's l2_allocate, before anything is written: the refcounts are broken
        corruption_event(img, "Preventing invalid allocation of L2 table at offset 0")
        raise CorruptImage(img.path, 0, "L2 table allocation", 0, "Preventing invalid allocation of L2 table at offset 0")
    img.refcache.flush()  # the new table is counted on disk before anything points at it
    table = img.l2cache.get_empty(new_off)
    if old is not None:
        table[:] = old
    img._pwrite(new_off, bytes(table), WriteSite.L2_ALLOC)
    if not inject.on("l2-alloc-no-flush"):
        img._file_flush()
    # As QEMU's l2_allocate: the in-memory L1 changes only once the entry is on disk (a failed write keeps the old).
    entry = new_off | spec.QCOW_OFLAG_COPIED
    img._pwrite(img.hdr.l1_table_offset + 8 * l1_index, entry.to_bytes(8, "big"), WriteSite.L1)
    img.l1[l1_index] = entry
    img.overlap.invalidate()
    img._file_flush()
    if old is not None:
        img.free_cluster(l2_off)
    return new_off, table


def link_l2(img: "Qcow2Image", l2_off: int, table: bytearray, idx: int, entry: int, *, stale: bool,
            allocating: bool) -> None:
    """Point an L2 entry at a cluster whose data has been written (QEMU's qcow2_alloc_cluster_link_l2)."""
    if stale and not inject.on("data-after-l2"):
        img.l2cache.depends_on_flush = True
    if allocating and img.lazy and not inject.on("dirty-set-late"):
        mark_dirty(img)
    # Injected dirty-set-late: the L2 table is treated as lazy (no wait for the refcount
    # block) and written before the dirty bit.
    late = allocating and img.lazy and inject.on("dirty-set-late")
    if allocating and img._need_accurate_refcounts() and not inject.on("l2-before-refblock") and not late:
        img.l2cache.set_dependency(img.refcache)
    set_entry(table, idx, entry)
    img.l2cache.mark_dirty(l2_off)
    if late:
        img.l2cache.write()
        mark_dirty(img)


def write(img: "Qcow2Image", offset: int, data: bytes) -> None:
    """Write guest bytes cluster by cluster (the request is already checked)."""
    view = memoryview(data)
    done = 0
    first_l1 = img.geo.offset_to_l1_index(offset)
    for pos, in_off, n in chunks(img.geo, offset, len(data)):
        if inject.on("l2-crossing-write-one-table") and img.geo.offset_to_l1_index(pos) != first_l1:
            # Injected: no per-L2-table clamp; the first table's wrapped-around index maps the cluster.
            pos -= (img.geo.offset_to_l1_index(pos) - first_l1) * img.geo.l2_entries * img.geo.cluster_size
        write_cluster(img, pos, in_off, view[done : done + n])
        done += n


def write_cluster(img: "Qcow2Image", guest: int, in_off: int, chunk: memoryview) -> None:
    """Write within one guest cluster: in place when it is ours (COPIED), else into a new cluster (COW)."""
    cs = img.geo.cluster_size
    entry, ctype, host = lookup(img, guest)
    if ctype is ClusterType.NORMAL and entry & spec.QCOW_OFLAG_COPIED:
        img._pwrite(host + in_off, bytes(chunk), WriteSite.DATA)
        return
    l2_off, table = l2_for_write(img, guest)
    idx = img.geo.offset_to_l2_index(guest)
    if ctype is ClusterType.NORMAL:
        # Shared cluster (no COPIED): copy it out before writing (never happens without snapshots).
        buf = bytearray(read_exact(img.file, host, cs))
    else:
        buf = bytearray(cs)
    buf[in_off : in_off + len(chunk)] = chunk
    reuse = ctype is ClusterType.ZERO_ALLOC and entry & spec.QCOW_OFLAG_COPIED
    new_host = host if reuse else img.alloc_clusters(1)
    # A copy of a shared cluster holds other sectors' data: it must be durable before the
    # L2 entry that exposes it (QEMU: l2 cache depends_on_flush after a COW), like reuse.
    stale = new_host < img.file.size() or ctype is ClusterType.NORMAL
    img._pwrite(new_host, bytes(buf), WriteSite.DATA)
    copied = 0 if inject.on("copied-flag-wrong") else spec.QCOW_OFLAG_COPIED
    link_l2(img, l2_off, table, idx, new_host | copied, stale=stale, allocating=not reuse)
    if host and not reuse:
        img.free_cluster(host)
