"""Zeroing and discarding guest ranges: the zero flag, unallocated entries and freed clusters (QEMU's zero_in_l2_slice and discard_in_l2_slice)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.qcow2 import inject, spec
from models.qcow2.cluster_write import l2_for_write, write_cluster
from models.qcow2.entries import ClusterType, set_entry
from models.qcow2.guestmap import chunks, l2_table_offset, lookup

if TYPE_CHECKING:
    from models.qcow2.image import Qcow2Image


def write_zeroes(img: "Qcow2Image", offset: int, length: int) -> None:
    """v3: whole clusters get the zero flag (allocation kept); partial clusters and v2 write zero bytes."""
    cs = img.geo.cluster_size
    for pos, in_off, n in chunks(img.geo, offset, length):
        if img.hdr.version < 3 or n != cs:
            write_cluster(img, pos, in_off, memoryview(bytes(n)))
            continue
        entry, ctype, host = lookup(img, pos)
        if ctype is ClusterType.ZERO_PLAIN or (ctype is ClusterType.ZERO_ALLOC):
            continue
        l2_off, table = l2_for_write(img, pos)
        new = spec.QCOW_OFLAG_ZERO
        if ctype is ClusterType.NORMAL:
            # Keep the cluster (QEMU without MAY_UNMAP); a shared one stays shared, without COPIED.
            new |= host | (entry & spec.QCOW_OFLAG_COPIED)
        set_entry(table, img.geo.offset_to_l2_index(pos), new)
        img.l2cache.mark_dirty(l2_off)


def discard(img: "Qcow2Image", offset: int, length: int) -> None:
    """Whole clusters inside the range become unallocated (v2) or zero (v3); partial clusters are left alone."""
    cs = img.geo.cluster_size
    for pos, in_off, n in chunks(img.geo, offset, length):
        # A partial last cluster of the disk counts as whole when the request reaches the end (as QEMU).
        whole_tail = in_off == 0 or inject.on("discard-tail-whole-cluster")
        if n != cs and not (whole_tail and pos + n == img.hdr.size):
            continue
        l2_off = l2_table_offset(img, img.geo.offset_to_l1_index(pos))
        if not l2_off:
            continue
        entry, ctype, host = lookup(img, pos)
        if ctype in (ClusterType.UNALLOCATED, ClusterType.ZERO_PLAIN):
            continue
        l2_off, table = l2_for_write(img, pos)  # a table shared with a snapshot is copied first
        set_entry(table, img.geo.offset_to_l2_index(pos), spec.QCOW_OFLAG_ZERO if img.hdr.version >= 3 else 0)
        img.l2cache.mark_dirty(l2_off)
        img.free_cluster(host)
