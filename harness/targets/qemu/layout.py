"""Which on-disk structure each host cluster of a qcow2 image holds, read tolerantly from the image's bytes.

The blklogwrites log records offsets and bytes, not intentions; the write sites qcrash
reports (models.blockio.WriteSite) are recovered by looking at the metadata that the
image holds at that point of the log. This module is the lookup: a `Layout` maps host
clusters to roles (header, L1, L2, refcount table, refcount block, data).

It never raises on odd bytes: a crash-in-progress or half-written image still yields a
layout, with out-of-range pointers ignored, because classification must not stop a run
(judging the image is the checker's job, not this one's).
"""

from __future__ import annotations

import dataclasses
import enum
import struct

__all__ = ["Role", "Layout", "read_layout"]

_U64 = struct.Struct(">Q")
_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # L1E_OFFSET_MASK / L2E_OFFSET_MASK
_REFT_MASK = 0xFFFFFFFFFFFFFE00
_COMPRESSED = 1 << 62
_INCOMPAT_EXTL2 = 1 << 4
# Parsing stops at these sizes: a garbage l1_size must not make classification crawl.
_MAX_L1_ENTRIES = 1 << 20
_MAX_REFTABLE_ENTRIES = 1 << 20


class Role(enum.StrEnum):
    HEADER = "header"
    L1 = "l1"
    L2 = "l2"
    REFTABLE = "reftable"
    REFBLOCK = "refblock"
    DATA = "data"


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """Roles by host cluster index, and the metadata clusters whose contents define the layout."""

    cluster_bits: int
    roles: dict[int, Role]

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def role_of(self, offset: int, length: int) -> Role | None:
        """The role of the first cluster in [offset, offset+length) that has one, or None."""
        first = offset >> self.cluster_bits
        last = (offset + max(length, 1) - 1) >> self.cluster_bits
        for c in range(first, min(last, first + 64) + 1):
            role = self.roles.get(c)
            if role is not None:
                return role
        return None

    def touches_defining(self, offset: int, length: int) -> bool:
        """True if the range overlaps a cluster whose bytes define the layout (header, L1, L2, reftable)."""
        first = offset >> self.cluster_bits
        last = (offset + max(length, 1) - 1) >> self.cluster_bits
        if last - first > 4096:
            return True
        return any(self.roles.get(c) in _DEFINING for c in range(first, last + 1))


_DEFINING = frozenset({Role.HEADER, Role.L1, Role.L2, Role.REFTABLE})


def _u64s(image: bytes | bytearray, offset: int, count: int) -> tuple[int, ...]:
    chunk = bytes(image[offset:offset + 8 * count])
    chunk += bytes(8 * count - len(chunk))
    return struct.unpack(f">{count}Q", chunk)


def read_layout(image: bytes | bytearray) -> Layout | None:
    """The layout of a qcow2 image held in memory, or None if cluster 0 is not a qcow2 header."""
    if len(image) < 72 or image[:4] != b"QFI\xfb":
        return None
    cluster_bits = struct.unpack_from(">I", image, 20)[0]
    if not 9 <= cluster_bits <= 21:
        return None
    cs = 1 << cluster_bits
    version = struct.unpack_from(">I", image, 4)[0]
    l1_size = min(struct.unpack_from(">I", image, 36)[0], _MAX_L1_ENTRIES)
    l1_offset = struct.unpack_from(">Q", image, 40)[0]
    reft_offset = struct.unpack_from(">Q", image, 48)[0]
    reft_clusters = struct.unpack_from(">I", image, 56)[0]
    incompat = struct.unpack_from(">Q", image, 72)[0] if version >= 3 and len(image) >= 80 else 0
    entry_size = 16 if incompat & _INCOMPAT_EXTL2 else 8
    nclusters = (len(image) + cs - 1) >> cluster_bits
    roles: dict[int, Role] = {0: Role.HEADER}

    def claim(offset: int, nbytes: int, role: Role) -> None:
        # Past-EOF pointers are kept (a crash image may cut the file short) but bounded.
        first = offset >> cluster_bits
        limit = nclusters + 16
        for c in range(first, min(first + max(1, -(-nbytes // cs)), limit)):
            roles.setdefault(c, role)

    if l1_offset and not l1_offset % cs:
        claim(l1_offset, l1_size * 8, Role.L1)
        for l1e in _u64s(image, l1_offset, l1_size):
            l2 = l1e & _OFFSET_MASK
            if l2 and not l2 % cs:
                claim(l2, cs, Role.L2)
                _claim_data(image, l2, cs, entry_size, claim)
    if reft_offset and not reft_offset % cs:
        entries = min(reft_clusters * cs // 8, _MAX_REFTABLE_ENTRIES)
        claim(reft_offset, reft_clusters * cs, Role.REFTABLE)
        for rte in _u64s(image, reft_offset, entries):
            block = rte & _REFT_MASK
            if block and not block % cs:
                claim(block, cs, Role.REFBLOCK)
    return Layout(cluster_bits, roles)


def _claim_data(image: bytes | bytearray, l2: int, cs: int, entry_size: int, claim) -> None:
    n = cs // entry_size
    words = _u64s(image, l2, n * entry_size // 8)
    for i in range(0, len(words), entry_size // 8):
        l2e = words[i]
        if l2e & _COMPRESSED:
            continue  # qcrash never writes compressed clusters; their sizes are not cluster-shaped
        data = l2e & _OFFSET_MASK
        if data and not data % cs:
            claim(data, cs, Role.DATA)


def guest_allocated(image: bytes | bytearray) -> tuple[int, ...]:
    """Guest offsets of the clusters the active L1/L2 tables map (allocated or zero-allocated), ascending.

    Used only to choose which sectors the judge reads (foreign data hides in allocated
    clusters the model never wrote); the reading itself is QEMU's.
    """
    if len(image) < 72 or image[:4] != b"QFI\xfb":
        return ()
    cluster_bits = struct.unpack_from(">I", image, 20)[0]
    if not 9 <= cluster_bits <= 21:
        return ()
    cs = 1 << cluster_bits
    version, size = struct.unpack_from(">I", image, 4)[0], struct.unpack_from(">Q", image, 24)[0]
    l1_size = min(struct.unpack_from(">I", image, 36)[0], _MAX_L1_ENTRIES)
    l1_offset = struct.unpack_from(">Q", image, 40)[0]
    incompat = struct.unpack_from(">Q", image, 72)[0] if version >= 3 and len(image) >= 80 else 0
    step = 2 if incompat & _INCOMPAT_EXTL2 else 1
    per_l2 = cs // (8 * step)
    out = []
    for i, l1e in enumerate(_u64s(image, l1_offset, l1_size) if l1_offset else ()):
        l2 = l1e & _OFFSET_MASK
        if not l2 or l2 % cs:
            continue
        words = _u64s(image, l2, per_l2 * step)
        for j in range(per_l2):
            if words[j * step] & ~(1 << 63):  # any mapping (data, zero flag, compressed) but not COPIED alone
                guest = (i * per_l2 + j) * cs
                if guest < size:
                    out.append(guest)
    return tuple(out)


def refcounts_past_eof(image: bytes | bytearray, limit: int = 64) -> tuple[int, ...]:
    """Host clusters at or past the end of the file whose on-disk refcount is nonzero (at most `limit`).

    QEMU's check compares refcounts only for clusters inside the file; qcrash's contract is
    stricter (every refcount equals the references), so the judge asks for these separately.
    """
    if len(image) < 104 or image[:4] != b"QFI\xfb":
        return ()
    cluster_bits = struct.unpack_from(">I", image, 20)[0]
    if not 9 <= cluster_bits <= 21:
        return ()
    cs = 1 << cluster_bits
    version = struct.unpack_from(">I", image, 4)[0]
    order = struct.unpack_from(">I", image, 96)[0] if version >= 3 else 4
    if order > 6:
        return ()
    bits = 1 << order
    per_block = cs * 8 // bits
    reft_offset = struct.unpack_from(">Q", image, 48)[0]
    reft_clusters = struct.unpack_from(">I", image, 56)[0]
    if not reft_offset or reft_offset % cs:
        return ()
    nclusters = -(-len(image) // cs)
    out: list[int] = []
    entries = min(reft_clusters * cs // 8, _MAX_REFTABLE_ENTRIES)
    for i, rte in enumerate(_u64s(image, reft_offset, entries)):
        block = rte & _REFT_MASK
        if not block or (i + 1) * per_block <= nclusters:
            continue
        data = bytes(image[block:block + cs]).ljust(cs, b"\0")
        for j in range(max(0, nclusters - i * per_block), per_block):
            if _refcount(data, j, bits):
                out.append(i * per_block + j)
                if len(out) >= limit:
                    return tuple(out)
    return tuple(out)


def _refcount(block: bytes, index: int, bits: int) -> int:
    if bits >= 8:
        width = bits // 8
        return int.from_bytes(block[index * width:(index + 1) * width], "big")
    byte, shift = divmod(index * bits, 8)
    return (block[byte] >> shift) & ((1 << bits) - 1)
