"""The metadata overlap guard the check's own writes pass through (qcow2_check_metadata_overlap, "cached" template)."""

from __future__ import annotations

from models.qcow2 import spec
from models.qcow2.check.imrt import nonzero_values
from models.qcow2.check.state import CheckState
from models.qcow2.overlap import OL_NAMES  # QEMU's names, one table for the image's guard and the check's

__all__ = ["qcow2_check_metadata_overlap", "pre_write_overlap_check"]


def _clusters_of(s: CheckState, start: int, length: int) -> range:
    return range(s.geo.offset_to_cluster(start), s.geo.offset_to_cluster(start + length - 1) + 1)


def _metadata_clusters(s: CheckState) -> dict[str, set[int]]:
    """Host clusters of the active L2 tables and of the refcount blocks (rebuilt after a reftable switch)."""
    if s.ol_cache is None:
        # (non-zero entries only, found in C: a 2 MiB-cluster refcount table holds 262,144, nearly all zero)
        l2: set[int] = set()
        for entry in nonzero_values(s.l1):
            if entry & spec.L1E_OFFSET_MASK:
                l2.update(_clusters_of(s, entry & spec.L1E_OFFSET_MASK, s.cs))
        refblocks: set[int] = set()
        for entry in nonzero_values(s.reftable):
            if entry & spec.REFT_OFFSET_MASK:
                refblocks.update(_clusters_of(s, entry & spec.REFT_OFFSET_MASK, s.cs))
        s.ol_cache = {"l2": l2, "refblock": refblocks}
    return s.ol_cache


def qcow2_check_metadata_overlap(s: CheckState, offset: int, size: int, ignore: frozenset[str] = frozenset()) -> str | None:
    """The name of the metadata a write of [offset, offset + size) would hit, or None (no inactive L2 tables, no bitmaps)."""
    if not size:
        return None
    if "header" not in ignore and offset < s.cs:
        return "header"
    written = _clusters_of(s, offset, size)

    def hits(start: int, length: int) -> bool:
        table = _clusters_of(s, start, length)
        return written.start < table.stop and table.start < written.stop

    if "l1" not in ignore and s.l1_size and hits(s.l1_offset, s.l1_size * 8):
        return "l1"
    if "reftable" not in ignore and s.reftable and hits(s.reftable_offset, len(s.reftable) * 8):
        return "reftable"
    if "snapshots" not in ignore and s.snapshots_size and hits(s.hdr.snapshots_offset, s.snapshots_size):
        return "snapshots"
    if "inactive-l1" not in ignore and any(sn.l1_size and hits(sn.l1_table_offset, sn.l1_size * 8) for sn in s.snapshots):
        return "inactive-l1"
    tables = _metadata_clusters(s)
    for name in ("l2", "refblock"):
        if name not in ignore and any(c in tables[name] for c in written):
            return name
    return None


def pre_write_overlap_check(s: CheckState, offset: int, size: int, ignore: frozenset[str] = frozenset()) -> bool:
    """True when the write may go ahead; otherwise the image is marked corrupt (fatal event)."""
    hit = qcow2_check_metadata_overlap(s, offset, size, ignore)
    if hit is None:
        return True
    s.signal_corruption(True, f"Preventing invalid write on metadata (overlaps with {OL_NAMES[hit]})")
    return False
