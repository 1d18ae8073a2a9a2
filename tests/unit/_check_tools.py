"""Helpers shared by the qcow2 checker unit tests: a hand-made image builder (no QEMU needed), the COPIED flag, the incompatible-features word, and the QEMU marker."""

from __future__ import annotations

import dataclasses
import shutil
import struct

import pytest

from models.blockio import MemoryFile
from models.qcow2 import spec
from models.qcow2.geometry import set_refcount
from models.qcow2.structs import Header

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


def needs_qemu(test):
    """Mark a test as QEMU-dependent and skip it cleanly without qemu-img/qemu-io."""
    skip = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed (Debian package qemu-utils)")
    return pytest.mark.qemu(skip(test))


COPIED = 1 << 63


# A hand-made image builder: header, reftable, refblocks, L1, L2s, data.


@dataclasses.dataclass
class Built:
    data: bytearray
    cluster_bits: int
    refcount_order: int
    reftable_offset: int
    reftable_clusters: int
    refblock_offsets: list[int]
    l1_offset: int
    l2_offsets: dict[int, int]  # l1 index -> L2 offset
    data_offsets: dict[int, int]  # guest cluster -> host offset

    @property
    def cs(self) -> int:
        return 1 << self.cluster_bits

    def u64(self, offset: int) -> int:
        return struct.unpack_from(">Q", self.data, offset)[0]

    def put64(self, offset: int, value: int) -> None:
        struct.pack_into(">Q", self.data, offset, value)

    def l2_entry_offset(self, guest_cluster: int) -> int:
        l2e = self.cs // 8
        return self.l2_offsets[guest_cluster // l2e] + (guest_cluster % l2e) * 8

    def set_refcount(self, cluster: int, value: int) -> None:
        per = self.cs * 8 >> self.refcount_order
        block = self.refblock_offsets[cluster // per]
        raw = bytearray(self.data[block : block + self.cs])
        set_refcount(raw, cluster % per, self.refcount_order, value)
        self.data[block : block + self.cs] = raw

    def file(self) -> MemoryFile:
        return MemoryFile(bytes(self.data), name="built.qcow2")


def build(
    *,
    cluster_bits: int = 16,
    refcount_order: int = 4,
    version: int = 3,
    size: int = 64 << 20,
    guest: dict[int, int] | None = None,
    lazy: bool = False,
    dirty: bool = False,
) -> Built:
    """A consistent image; `guest` maps guest cluster -> fill byte of its data cluster."""
    guest = guest or {}
    cs = 1 << cluster_bits
    l2e = cs // 8
    per_block = cs * 8 >> refcount_order
    l1_size = max(1, -(-size // (cs * l2e)))
    l1_clusters = -(-l1_size * 8 // cs)
    l2_indices = sorted({g // l2e for g in guest})
    fixed = 1 + l1_clusters + len(l2_indices) + len(guest)
    nrt, nrb = 1, 1
    while nrb * per_block < fixed + nrt + nrb or nrt * cs // 8 < nrb:
        if nrt * cs // 8 < nrb:
            nrt += 1
        else:
            nrb += 1
    total = fixed + nrt + nrb
    buf = bytearray(total * cs)
    reftable_offset = cs
    refblocks = [(1 + nrt + i) * cs for i in range(nrb)]
    l1_offset = (1 + nrt + nrb) * cs
    next_cluster = 1 + nrt + nrb + l1_clusters
    l2_offsets = {}
    for index in l2_indices:
        l2_offsets[index] = next_cluster * cs
        next_cluster += 1
    data_offsets = {}
    for g in sorted(guest):
        data_offsets[g] = next_cluster * cs
        buf[next_cluster * cs : (next_cluster + 1) * cs] = bytes([guest[g]]) * cs
        next_cluster += 1
    assert next_cluster == total
    hdr = Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=reftable_offset,
        refcount_table_clusters=nrt,
        incompatible_features=int(spec.IncompatFeature.DIRTY) if dirty else 0,
        compatible_features=int(spec.CompatFeature.LAZY_REFCOUNTS) if lazy else 0,
        refcount_order=refcount_order if version >= 3 else 4,
        header_length=spec.V3_HEADER_LENGTH if version >= 3 else spec.V2_HEADER_LENGTH,
    )
    raw = hdr.pack()
    buf[: len(raw)] = raw
    for i, off in enumerate(refblocks):
        struct.pack_into(">Q", buf, reftable_offset + 8 * i, off)
    for index, off in l2_offsets.items():
        struct.pack_into(">Q", buf, l1_offset + 8 * index, off | COPIED)
    for g, off in data_offsets.items():
        l2 = l2_offsets[g // l2e]
        struct.pack_into(">Q", buf, l2 + 8 * (g % l2e), off | COPIED)
    built = Built(buf, cluster_bits, hdr.refcount_order, reftable_offset, nrt, refblocks, l1_offset, l2_offsets, data_offsets)
    for cluster in range(total):
        built.set_refcount(cluster, 1)
    return built


def incompat(buf: bytes) -> int:
    return struct.unpack_from(">Q", buf, 72)[0]
