"""The in-memory refcount table (QEMU's IMRT) and the vectorised decoding of on-disk refcount blocks."""

from __future__ import annotations

import array
import bisect
import itertools
import sys
from typing import MutableSequence

import numpy

from models.qcow2.geometry import set_refcount
from models.qcow2.scan import nonzero_bytes, nonzero_words

__all__ = ["Imrt", "PackedView", "decode_refblock", "nonzero_refcounts", "nonzero_subbyte", "refblock_view"]


class Imrt:
    """The in-memory refcount table: sparse, saturating at the image's refcount_max like QEMU's packed array.

    Sparse (a dict) so that a huge sparse host file costs nothing. The sorted list of used
    clusters, which only the rebuild needs, is built on first use and kept up to date
    from then on, so counting references (the hot path) is one dict update.
    """

    __slots__ = ("size", "per_block", "counts", "_sorted", "version", "_dense")

    def __init__(self, size: int, per_block: int) -> None:
        self.size = size  # QEMU's *nb_clusters / *refcount_table_size
        self.per_block = per_block
        self.counts: dict[int, int] = {}
        self._sorted: list[int] | None = None
        self.version = 0  # bumped by every change of the counts (`changed`): what `dense` is cached by
        self._dense: tuple[int, int, numpy.ndarray] | None = None

    def get(self, cluster: int) -> int:
        return self.counts.get(cluster, 0)

    def set(self, cluster: int, value: int) -> None:
        self.version += 1
        counts = self.counts
        if value:
            if self._sorted is not None and cluster not in counts:
                bisect.insort(self._sorted, cluster)
            counts[cluster] = value
        elif cluster in counts:
            del counts[cluster]
            if self._sorted is not None:
                del self._sorted[bisect.bisect_left(self._sorted, cluster)]

    def changed(self) -> None:
        """Note a change made to `counts` directly (not through `set`)."""
        self.version += 1

    def dense(self, limit: int) -> numpy.ndarray:
        """The counts of clusters [0, limit) as one native u64 array, built in C and kept until the counts change.

        The compare pass diffs it against the on-disk refcounts at once; a repair's dry
        pass and its fixing pass, which see the same counts, share one.
        """
        cached = self._dense
        if cached is not None and cached[0] == self.version and cached[1] == limit:
            return cached[2]
        counts = self.counts
        n = len(counts)
        out = numpy.zeros(limit, dtype=numpy.uint64)
        if n:
            keys = numpy.fromiter(counts.keys(), dtype=numpy.int64, count=n)
            values = numpy.fromiter(counts.values(), dtype=numpy.uint64, count=n)
            inside = keys < limit
            out[keys[inside]] = values[inside]
        out.flags.writeable = False
        self._dense = (self.version, limit, out)
        return out

    @property
    def ordered(self) -> bool:
        """Whether the sorted list of used clusters is kept (then every count goes through `set`)."""
        return self._sorted is not None

    def grow(self, new_size: int) -> None:
        if new_size > self.size:
            self.size = new_size

    def _used(self) -> list[int]:
        if self._sorted is None:
            self._sorted = sorted(self.counts)
        return self._sorted

    def next_used(self, cluster: int, end: int) -> int | None:
        """The first cluster in [cluster, end) with a non-zero count."""
        used = self._used()
        pos = bisect.bisect_left(used, cluster)
        if pos < len(used) and used[pos] < end:
            return used[pos]
        return None

    def refblock_bytes(self, block: int, cluster_size: int, order: int) -> bytearray:
        """The refcount block `block` as the rebuild writes it, from the counts alone."""
        out = bytearray(cluster_size)
        base = block * self.per_block
        used = self._used()
        lo = bisect.bisect_left(used, base)
        hi = bisect.bisect_left(used, base + self.per_block)
        counts = self.counts
        for cluster in used[lo:hi]:
            set_refcount(out, cluster - base, order, counts[cluster])
        return out


# From these sizes numpy finds non-zero entries faster than a walk in C over decoded items
# (its fixed cost per call, a few microseconds, is more than a small table's walk).
_NUMPY_BYTES = 8192
_NUMPY_ENTRIES = _NUMPY_BYTES // 8


def nonzero_refcounts(block: bytes | bytearray, order: int, limit: int) -> list[int]:
    """Indices of the non-zero entries among the first `limit` of a refcount block, ascending.

    Found in C: a small block (under 8 KiB) is decoded whole and compressed; a larger one
    (a refcount block of a 2 MiB cluster holds up to 16 million entries, nearly all zero
    in the images the harness makes) is scanned for non-zero bytes by numpy.
    """
    if order >= 3:
        width = 1 << (order - 3)
        if limit * width < _NUMPY_BYTES:
            return list(itertools.compress(range(limit), decode_refblock(block[:limit * width], order)))
        found = nonzero_bytes(block, 0, min(len(block), limit * width))
        return (numpy.unique(found // width) if width > 1 else found).tolist()
    return nonzero_subbyte(block, order, 0, limit)


def nonzero_subbyte(block: bytes | bytearray, order: int, start: int, limit: int) -> list[int]:
    """Indices in [start, limit) of the non-zero entries of a sub-byte refcount block, ascending.

    A small block is decoded whole; a large one is scanned for non-zero bytes by numpy and
    only those bytes are split into entries (a 1 MiB block of 1-bit refcounts holds 8 million)."""
    per_byte = 8 >> order
    first_byte, end_byte = start // per_byte, (limit + per_byte - 1) // per_byte
    if end_byte - first_byte < _NUMPY_BYTES:
        view = decode_refblock(block[first_byte:end_byte], order)
        base = first_byte * per_byte
        return list(itertools.compress(range(start, limit), view[start - base:limit - base]))
    width, mask = 1 << order, (1 << (1 << order)) - 1
    out: list[int] = []
    for pos in nonzero_bytes(block, first_byte, end_byte).tolist():
        byte, at = block[pos], pos * per_byte
        out.extend(at + k for k in range(per_byte) if (byte >> (k * width)) & mask and start <= at + k < limit)
    return out


def nonzero_entries(table: array.array, start: int = 0) -> list[int]:
    """Indices >= `start` of the non-zero entries of a u64 table (a refcount table), ascending.

    A 2 MiB-cluster refcount table holds 262,144 entries, nearly all zero: they are found
    by numpy (models/qcow2/scan.py says why), on the array's own buffer.
    """
    if start >= len(table):
        return []
    if len(table) - start < _NUMPY_ENTRIES:
        return list(itertools.compress(range(start, len(table)), table[start:]))
    view = numpy.frombuffer(table, dtype=numpy.uint64)[start:]
    return (nonzero_words(view) + start).tolist()


def as_u64_table(table) -> array.array:
    """A table of u64 entries (a refcount table, an L1) as an array: itself, or a list copied in C."""
    return table if isinstance(table, array.array) and table.typecode == "Q" else array.array("Q", table)


def nonzero_values(table) -> list[int]:
    """The non-zero entries of a u64 table, in table order (a 2 MiB-cluster refcount table: by `nonzero_entries`)."""
    if len(table) < _NUMPY_ENTRIES:
        return [e for e in table if e]
    table = as_u64_table(table)
    return [table[i] for i in nonzero_entries(table)]


_ARRAY_CODE = {4: "H", 5: "I", 6: "Q"}
# For sub-byte widths: for each position k within a byte, a 256-byte translation table that
# extracts entry k (bit 0 at the least significant end, as the spec packs them).
_SUBBYTE_TABLES = {
    order: [bytes((b >> (k << order)) & ((1 << (1 << order)) - 1) for b in range(256)) for k in range(8 >> order)]
    for order in (0, 1, 2)
}


class PackedView:
    """A sub-byte refcount block's entries read and written in place, one at a time.

    Decoding a 1 MiB block of 1-bit refcounts makes 8 million entries (8 translations of
    the block, 2 ms), and a check then looks at a handful of them: a large sub-byte block
    is viewed through this instead. Writes go to the block itself, so the view and the
    block never disagree.
    """

    __slots__ = ("block", "order", "shift", "low", "mask")

    def __init__(self, block: bytearray, order: int) -> None:
        self.block, self.order = block, order
        self.shift = 3 - order  # entries per byte = 1 << shift
        self.low = (1 << self.shift) - 1
        self.mask = (1 << (1 << order)) - 1

    def __len__(self) -> int:
        return len(self.block) << self.shift

    def __getitem__(self, index: int) -> int:
        return (self.block[index >> self.shift] >> ((index & self.low) << self.order)) & self.mask

    def __setitem__(self, index: int, value: int) -> None:
        set_refcount(self.block, index, self.order, value)


_PACKED_FROM = 65536  # bytes of sub-byte refcount block from which it is viewed packed, not decoded


def refblock_view(block: bytearray, order: int) -> MutableSequence[int]:
    """The entries of a cached refcount block for lookups: decoded (small or byte-wide blocks) or a PackedView over it."""
    if order < 3 and len(block) >= _PACKED_FROM:
        return PackedView(block, order)  # type: ignore[return-value]
    return decode_refblock(block, order)


def decode_refblock(block: bytes | bytearray, order: int) -> MutableSequence[int]:
    """Every entry of a refcount block as a sequence of ints, decoded in C (array, bytes.translate).

    Order 3 returns `block` itself (one byte per entry), so updates to the block are seen.
    For the other widths the caller must update the decoded copy alongside the block.
    """
    if order == 3:
        return block  # type: ignore[return-value]
    if order > 3:
        code = _ARRAY_CODE[order]
        out = array.array(code)
        assert out.itemsize * 8 == 1 << order, f"array code {code!r} is not {1 << order} bits wide here"
        out.frombytes(bytes(block))
        if sys.byteorder == "little":
            out.byteswap()
        return out
    tables = _SUBBYTE_TABLES[order]
    per_byte = len(tables)
    decoded = bytearray(len(block) * per_byte)
    for k, table in enumerate(tables):
        decoded[k::per_byte] = bytes(block).translate(table)
    return decoded
