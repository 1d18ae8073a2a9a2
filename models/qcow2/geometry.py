"""The cluster geometry helpers, named as in qcow2.h; no bare shifts outside this module."""

from __future__ import annotations

import dataclasses
import functools


@dataclasses.dataclass(frozen=True, slots=True)
class Geometry:
    cluster_bits: int
    refcount_order: int
    # Derived once (these are read millions of times per crash sweep in the check's loops).
    cluster_size: int = dataclasses.field(init=False, repr=False, compare=False)
    l2_entries: int = dataclasses.field(init=False, repr=False, compare=False)
    refcount_bits: int = dataclasses.field(init=False, repr=False, compare=False)
    refcount_max: int = dataclasses.field(init=False, repr=False, compare=False)
    refblock_entries: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        derived = {"cluster_size": 1 << self.cluster_bits, "refcount_bits": 1 << self.refcount_order}
        derived["l2_entries"] = derived["cluster_size"] // 8
        derived["refcount_max"] = (1 << derived["refcount_bits"]) - 1
        derived["refblock_entries"] = derived["cluster_size"] * 8 // derived["refcount_bits"]
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def offset_into_cluster(self, offset: int) -> int:
        return offset & (self.cluster_size - 1)

    def start_of_cluster(self, offset: int) -> int:
        return offset & ~(self.cluster_size - 1)

    def size_to_clusters(self, size: int) -> int:
        return (size + self.cluster_size - 1) >> self.cluster_bits

    def offset_to_cluster(self, offset: int) -> int:
        return offset >> self.cluster_bits

    def cluster_to_offset(self, cluster: int) -> int:
        return cluster << self.cluster_bits

    def offset_to_l1_index(self, offset: int) -> int:
        return offset >> (self.cluster_bits + self.cluster_bits - 3)

    def offset_to_l2_index(self, offset: int) -> int:
        return (offset >> self.cluster_bits) & (self.l2_entries - 1)

    def size_to_l1(self, size: int) -> int:
        """L1 entries needed for a virtual size (QEMU size_to_l1)."""
        shift = self.cluster_bits + self.cluster_bits - 3
        return (size + (1 << shift) - 1) >> shift

    def reftable_index(self, cluster: int) -> int:
        return cluster // self.refblock_entries

    def refblock_index(self, cluster: int) -> int:
        return cluster % self.refblock_entries

    def is_aligned(self, offset: int) -> bool:
        return self.offset_into_cluster(offset) == 0

    @property
    def csize_shift(self) -> int:
        """Where a compressed L2 entry's sector count starts (62 - (cluster_bits - 8), QEMU's s->csize_shift)."""
        return 62 - (self.cluster_bits - 8)

    def parse_compressed_l2_entry(self, entry: int) -> tuple[int, int]:
        """(host offset, size in bytes) of a compressed cluster, as QEMU's qcow2_parse_compressed_l2_entry."""
        shift = self.csize_shift
        coffset = entry & ((1 << shift) - 1)
        nb_csectors = ((entry >> shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        return coffset, nb_csectors * 512 - (coffset & 511)


@functools.lru_cache(maxsize=128)
def geometry_of(cluster_bits: int, refcount_order: int) -> Geometry:
    """The Geometry of a cluster size and refcount width, made once and shared (it is frozen): every open
    and check state asks for one, and deriving its fields was 2% of a dev-mix sweep."""
    return Geometry(cluster_bits, refcount_order)


def get_refcount(block: bytes | bytearray, index: int, order: int) -> int:
    """Read entry `index` of a refcount block of width 1 << order (sub-byte widths: bit 0 at the LSB)."""
    if order < 3:
        bits = 1 << order
        per_byte = 8 // bits
        return (block[index // per_byte] >> ((index % per_byte) * bits)) & ((1 << bits) - 1)
    width = 1 << (order - 3)
    return int.from_bytes(block[index * width : (index + 1) * width], "big")


def set_refcount(block: bytearray, index: int, order: int, value: int) -> None:
    if order < 3:
        bits = 1 << order
        per_byte = 8 // bits
        shift = (index % per_byte) * bits
        mask = ((1 << bits) - 1) << shift
        pos = index // per_byte
        block[pos] = (block[pos] & ~mask) | ((value << shift) & mask)
        return
    width = 1 << (order - 3)
    block[index * width : (index + 1) * width] = value.to_bytes(width, "big")
