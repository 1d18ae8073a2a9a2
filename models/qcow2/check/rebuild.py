"""Rebuilding the refcount structure from the IMRT (QEMU's rebuild_refcount_structure), made crash-safe.

Deliberate differences from QEMU, both for crash safety:

- a flush between writing the rebuilt refcount structures and switching the header to
  them (QEMU writes the header right after them, unflushed);
- the rebuild never allocates a cluster that an on-disk reference points at, even when
  that reference lies a full cluster or more past EOF (QEMU would place a refblock there
  and so hand refcount data to the guest, or fail its overlap check).

Each refcount block is built in memory from the IMRT and written once.
"""

from __future__ import annotations

import array
import struct
import sys

from models.blockio import WriteSite
from models.qcow2.check.imrt import Imrt
from models.qcow2.check.overlap import pre_write_overlap_check
from models.qcow2.check.result import Kind
from models.qcow2.check.state import CheckState
from models.qcow2.structs import FIELD_OFFSET

__all__ = ["alloc_clusters_imrt", "rebuild_refcounts_write_refblocks", "rebuild_refcount_structure"]


def alloc_clusters_imrt(s: CheckState, imrt: Imrt, count: int, first_free: int) -> tuple[int, int]:
    """Allocate `count` contiguous clusters in the IMRT; returns (host offset, updated first_free)."""
    cluster = first_free
    contiguous = 0
    first_gap = True
    avoid = s.past_eof_clusters
    while cluster < imrt.size and contiguous < count:
        if not imrt.get(cluster) and cluster not in avoid:
            contiguous += 1
            if first_gap:
                first_free = cluster
                first_gap = False
        elif contiguous:
            contiguous = 0
        cluster += 1
    if contiguous < count:
        # Clusters past the IMRT's end are free, except where a reference past EOF points.
        while contiguous < count:
            if cluster in avoid:
                contiguous = 0
            else:
                contiguous += 1
            cluster += 1
        imrt.grow(cluster)
    cluster -= contiguous
    for i in range(count):
        imrt.set(cluster + i, 1)
    return s.geo.cluster_to_offset(cluster), first_free


def rebuild_refcounts_write_refblocks(s: CheckState, imrt: Imrt, first: int, end: int, reftable: array.array) -> bool:
    """Write a refcount block for every block range of [first, end) in use; returns whether the new reftable grew."""
    cs, geo = s.cs, s.geo
    first_free = 0
    grown = False
    cluster = first
    while True:
        found = imrt.next_used(cluster, end)
        if found is None:
            break
        cluster = found
        index = geo.reftable_index(cluster)
        start = index * s.rb_entries
        if index < len(reftable) and reftable[index]:
            offset = reftable[index]
        else:
            first_free = max(first_free, start)
            offset, first_free = alloc_clusters_imrt(s, imrt, 1, first_free)
            if geo.offset_to_cluster(offset) >= end:
                end = geo.offset_to_cluster(offset) + 1
            if len(reftable) <= index:
                entries = geo.size_to_clusters((index + 1) * 8) * cs // 8
                reftable.frombytes(bytes(8 * (entries - len(reftable))))  # (zeros)
                grown = True
            reftable[index] = offset
        if not pre_write_overlap_check(s, offset, cs):
            raise s.fail(Kind.REBUILD_FAILED, "qemu-img: ERROR writing refblock: Input/output error")
        s.file.pwrite(offset, bytes(imrt.refblock_bytes(index, cs, s.order)), WriteSite.REPAIR)
        cluster = start + s.rb_entries
    return grown


def rebuild_refcount_structure(s: CheckState, imrt: Imrt) -> None:
    """Write new refcount blocks and a new table for the IMRT, make them durable, then switch the header to them."""
    s.flush_refblocks()
    s.drop_refblocks()
    # An array, as the table the check decoded (`CheckState.reftable`): scanned in C after the switch.
    reftable = array.array("Q")
    grown = rebuild_refcounts_write_refblocks(s, imrt, 0, imrt.size, reftable)
    assert grown
    while True:
        length = len(reftable) * 8
        clusters = s.geo.size_to_clusters(length)
        rt_offset, _ = alloc_clusters_imrt(s, imrt, clusters, 0)
        start = s.geo.offset_to_cluster(rt_offset)
        if not rebuild_refcounts_write_refblocks(s, imrt, start, start + clusters, reftable):
            break
    if not pre_write_overlap_check(s, rt_offset, length):
        raise s.fail(Kind.REBUILD_FAILED, "qemu-img: ERROR writing reftable: Input/output error")
    s.file.pwrite(rt_offset, _be_u64(reftable), WriteSite.REPAIR)
    # Everything the new header will point at must be durable before the header does.
    s.repair_flush()
    start = FIELD_OFFSET["refcount_table_offset"]
    assert FIELD_OFFSET["refcount_table_clusters"] == start + 8
    s.file.pwrite(start, struct.pack(">QI", rt_offset, clusters), WriteSite.REFTABLE_SWITCH)
    s.repair_flush()
    s.reftable = reftable
    s.reftable_offset = rt_offset
    s.ol_cache = None


def _be_u64(entries) -> bytes:
    """The entries as big-endian u64s, in C (struct.pack took them as 262,144 arguments with 2 MiB clusters)."""
    table = array.array("Q", entries)
    if sys.byteorder == "little":
        table.byteswap()
    return table.tobytes()
