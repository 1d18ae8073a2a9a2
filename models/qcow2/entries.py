"""L1, L2 and refcount-table entries: raw 64-bit values apart from their meaning (QEMU's cluster types).

QEMU's cluster-type table for a standard (non-extended) L2 entry:

    UNALLOCATED   entry == 0 (no zero flag, no offset)
    ZERO_PLAIN    zero flag set, offset 0           reads as zeros, owns no cluster
    ZERO_ALLOC    zero flag set, offset != 0        reads as zeros, keeps its cluster
    NORMAL        offset != 0, no zero flag         data at the host offset
    COMPRESSED    bit 62 set                        (refused by qcrash)
"""

from __future__ import annotations

import enum

from models.qcow2 import spec


class ClusterType(enum.Enum):
    UNALLOCATED = "unallocated"
    ZERO_PLAIN = "zero-plain"
    ZERO_ALLOC = "zero-alloc"
    NORMAL = "normal"
    COMPRESSED = "compressed"


def l2_cluster_type(entry: int, version: int) -> ClusterType:
    if entry & spec.QCOW_OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    offset = entry & spec.L2E_OFFSET_MASK
    # v2 has no zero flag: bit 0 is then a reserved bit, not "reads as zero".
    if version >= 3 and entry & spec.QCOW_OFLAG_ZERO:
        return ClusterType.ZERO_ALLOC if offset else ClusterType.ZERO_PLAIN
    return ClusterType.NORMAL if offset else ClusterType.UNALLOCATED


def not_normal_flags(version: int) -> int:
    """The flags that keep an L2 entry with a host offset from being NORMAL (`l2_cluster_type`): the compressed
    bit, and in v3 the zero flag (in v2 bit 0 is reserved). For loops that test thousands of entries inline."""
    return spec.QCOW_OFLAG_COMPRESSED | (spec.QCOW_OFLAG_ZERO if version >= 3 else 0)


def get_entry(table: bytes | bytearray, index: int) -> int:
    return int.from_bytes(table[index * 8 : index * 8 + 8], "big")


def set_entry(table: bytearray, index: int, value: int) -> None:
    table[index * 8 : index * 8 + 8] = value.to_bytes(8, "big")
