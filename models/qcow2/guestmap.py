"""Guest-to-host mapping and the guest read path (QEMU's qcow2_get_host_offset and qcow2_co_preadv_part)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Iterator

from models.blockio import read_exact
from models.qcow2 import inject, spec
from models.qcow2.scan import nonzero_u64_items
from models.qcow2.entries import ClusterType, get_entry, l2_cluster_type, not_normal_flags
from models.qcow2.errors import CorruptImage, UnsupportedFeature
from models.qcow2.geometry import Geometry
from models.qcow2.overlap import c_hex, corruption_event

if TYPE_CHECKING:
    from models.qcow2.image import Qcow2Image


def l2_table_offset(img: "Qcow2Image", l1_index: int) -> int:
    """The L2 table an L1 entry points at (0: none); an unaligned one is a corruption event."""
    l1e = img.l1[l1_index]
    l2_off = l1e & spec.L1E_OFFSET_MASK
    if l2_off and not img.geo.is_aligned(l2_off):
        corruption_event(img, f"L2 table offset {c_hex(l2_off)} unaligned (L1 index: {c_hex(l1_index)})")
        raise CorruptImage(img.path, img.hdr.l1_table_offset + 8 * l1_index, f"L1[{l1_index}]", l1e,
                           f"L2 table offset {l2_off:#x} not aligned to cluster size {img.geo.cluster_size:#x}")
    return l2_off


def lookup(img: "Qcow2Image", guest: int) -> tuple[int, ClusterType, int]:
    """(L2 entry, its type, host cluster offset) for a guest offset."""
    l2_off = l2_table_offset(img, img.geo.offset_to_l1_index(guest))
    if not l2_off:
        return 0, ClusterType.UNALLOCATED, 0
    idx = img.geo.offset_to_l2_index(guest)
    entry = get_entry(img.l2cache.get(l2_off), idx)
    ctype = l2_cluster_type(entry, img.hdr.version)
    if ctype is ClusterType.COMPRESSED:
        raise UnsupportedFeature(img.path, l2_off + 8 * idx, f"L2 entry {idx}", ["compressed clusters"])
    host = entry & spec.L2E_OFFSET_MASK
    if host and not img.geo.is_aligned(host):
        corruption_event(img, f"Cluster allocation offset {c_hex(host)} unaligned (L2 offset: {c_hex(l2_off)}, "
                              f"L2 index: {c_hex(idx)})")
        raise CorruptImage(img.path, l2_off + 8 * idx, f"L2 entry {idx}", entry,
                           f"data cluster offset {host:#x} not aligned to cluster size {img.geo.cluster_size:#x}")
    return entry, ctype, host


def chunks(geo: Geometry, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
    """(guest offset, offset into its cluster, length) for each cluster-bounded piece of a request."""
    cs = geo.cluster_size
    pos, end = offset, offset + length
    while pos < end:
        in_off = geo.offset_into_cluster(pos)
        n = min(cs - in_off, end - pos)
        yield pos, in_off, n
        pos += n


def read(img: "Qcow2Image", offset: int, length: int) -> bytes:
    """Guest bytes: each L2 table's slice is decoded once, and host-contiguous clusters are read in one pread."""
    geo = img.geo
    cs, per_l2 = geo.cluster_size, geo.l2_entries
    out = bytearray(length)
    run = [0, 0, 0]  # host offset, position in out, length: the pending pread

    def flush_run() -> None:
        if run[2]:
            out[run[1] : run[1] + run[2]] = read_exact(img.file, run[0], run[2])

    pos, end = offset, offset + length
    while pos < end:
        idx = geo.offset_to_l2_index(pos)
        span_end = min(end, geo.start_of_cluster(pos) + (per_l2 - idx) * cs)  # the rest of this L2 table's range
        l2_off = l2_table_offset(img, geo.offset_to_l1_index(pos))
        if not l2_off:
            pos = span_end  # unallocated L2 table: zeros
            continue
        n = geo.size_to_clusters(span_end - geo.start_of_cluster(pos))
        for k, entry in enumerate(struct.unpack_from(f">{n}Q", img.l2cache.get(l2_off), idx * 8)):
            in_off = geo.offset_into_cluster(pos)
            chunk = min(cs - in_off, span_end - pos)
            host = _read_host(img, entry, l2_off, idx + k)
            if host:
                if run[2] and run[0] + run[2] == host + in_off and run[1] + run[2] == pos - offset:
                    run[2] += chunk
                else:
                    flush_run()
                    run[:] = host + in_off, pos - offset, chunk
            pos += chunk
    flush_run()
    return bytes(out)


def _read_host(img: "Qcow2Image", entry: int, l2_off: int, idx: int) -> int:
    """The host cluster a read of this L2 entry returns data from, or 0 for zeros (as `lookup` decides)."""
    if entry & spec.QCOW_OFLAG_COMPRESSED:
        raise UnsupportedFeature(img.path, l2_off + 8 * idx, f"L2 entry {idx}", ["compressed clusters"])
    host = entry & spec.L2E_OFFSET_MASK
    if not host:
        return 0
    if not img.geo.is_aligned(host):
        raise CorruptImage(img.path, l2_off + 8 * idx, f"L2 entry {idx}", entry,
                           f"data cluster offset {host:#x} not aligned to cluster size {img.geo.cluster_size:#x}")
    if img.hdr.version >= 3 and entry & spec.QCOW_OFLAG_ZERO and not inject.on("stale-l2-entry-read"):
        return 0  # ZERO_ALLOC reads as zeros
    return host


def allocated_guest_clusters(img: "Qcow2Image") -> list[int]:
    """Guest offsets of every cluster that maps to host data (NORMAL entries), in guest order."""
    out: list[int] = []
    cs, per_l2, size = img.geo.cluster_size, img.geo.l2_entries, img.hdr.size
    # NORMAL (l2_cluster_type), tested inline: the judge lists every crash image's clusters,
    # thousands with 512-byte clusters. Not compressed, not the v3 zero flag, a host offset.
    special = not_normal_flags(img.hdr.version)
    mask = spec.L2E_OFFSET_MASK
    for i in range(len(img.l1)):
        l2_off = l2_table_offset(img, i)
        if not l2_off:
            continue
        base = i * per_l2 * cs
        out.extend([guest for j, entry in nonzero_u64_items(img.l2cache.get(l2_off))
                    if entry & mask and not entry & special and (guest := base + j * cs) < size])
    return out
