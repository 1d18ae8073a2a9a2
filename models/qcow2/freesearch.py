"""The free-cluster search behind cluster allocation: runs of refcount-0 clusters, bounded by QEMU's refcount-table limit (qcow2-refcount.c alloc_clusters_noref)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.qcow2 import spec
from models.qcow2.errors import CorruptImage
from models.qcow2.geometry import get_refcount

if TYPE_CHECKING:
    from models.qcow2.refcount import Refcounts

_MAX_REFTABLE_ENTRIES = spec.QCOW_MAX_REFTABLE_SIZE // 8


def first_zero(block: bytes | bytearray, start: int, order: int, entries: int) -> int | None:
    """Index of the first refcount-0 entry at or after `start` in a refcount block, or None."""
    if order >= 3:
        width = 1 << (order - 3)
        zero = bytes(width)
        pos = start * width
        end = entries * width
        while pos < end:
            found = block.find(zero, pos, end)
            if found < 0:
                return None
            if found % width == 0:
                return found // width
            pos = found + (width - found % width)  # realign: a zero run straddling two entries
        return None
    # Sub-byte widths: test the (partial) first byte entry by entry, then skip whole bytes
    # whose entries are all non-zero with a table lookup per byte.
    per_byte = 8 >> order
    idx = start
    while idx < entries and idx % per_byte:
        if get_refcount(block, idx, order) == 0:
            return idx
        idx += 1
    first = _SUB_BYTE_FIRST_ZERO[order]
    for pos in range(idx // per_byte, entries // per_byte):
        k = first[block[pos]]
        if k >= 0:
            return pos * per_byte + k
    return None


def _sub_byte_table(order: int) -> tuple[int, ...]:
    bits = 1 << order
    mask = (1 << bits) - 1
    return tuple(next((k for k in range(8 // bits) if not (b >> (k * bits)) & mask), -1) for b in range(256))


_SUB_BYTE_FIRST_ZERO = {order: _sub_byte_table(order) for order in range(3)}


def find_free(rc: "Refcounts", n: int) -> int:
    """First run of `n` clusters with refcount 0 that were not freed since the last flush.

    Bounded: between runs, `_skip_used` jumps over whole refcount blocks at byte-search
    speed (and over a block already seen full in O(1): a hostile reftable may point all
    its entries at one block of maximal counts), and a search that would need a
    refcount table beyond QEMU's 8 MiB limit fails with a named error (EFBIG).
    """
    c = rc.free_cluster_index
    run_start, run_len = c, 0
    lo, hi = rc.reserved
    full: set[int] = set()
    while run_len < n:
        if lo <= c < hi:
            c, run_len = hi, 0
            continue
        if run_len == 0:
            c = _skip_used(rc, c, full)
            if lo <= c < hi:
                continue
        if rc.refcount(c) == 0 and c not in rc.recently_freed:
            if run_len == 0:
                run_start = c
            run_len += 1
        else:
            run_len = 0
        c += 1
    return run_start


def _skip_used(rc: "Refcounts", c: int, full: set[int]) -> int:
    """The first cluster >= c whose refcount is 0 (clusters skipped are in use, so the result is the same)."""
    geo = rc.geo
    rbe = geo.refblock_entries
    reftable = rc.reftable
    while True:
        ri = c // rbe
        if ri >= _MAX_REFTABLE_ENTRIES:
            raise CorruptImage(rc.host.path, None, "free cluster search", c,
                               "no free cluster within the largest refcount table QEMU allows (8 MiB): "
                               "refcount blocks full of used clusters (EFBIG)")
        if ri >= len(reftable):
            return c
        block_off = reftable[ri] & spec.REFT_OFFSET_MASK
        if not block_off:
            return c
        if block_off not in full:
            idx = first_zero(rc.refcache.get(block_off), c - ri * rbe, geo.refcount_order, rbe)
            if idx is not None:
                return ri * rbe + idx
            if c == ri * rbe:
                full.add(block_off)
        c = (ri + 1) * rbe
