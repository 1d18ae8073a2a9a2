"""qcrash's deviations from QEMU at the end of the file: growing it over clusters referenced past EOF, and refcounts past EOF.

QEMU's check compares only clusters inside the file. With lazy refcounts a crash can
lose the growth of the file that a data write caused while keeping the L2 update, or
keep a flushed refcount for a cluster whose own write was lost; the crash contract asks
that every refcount equal the references, so qcrash's recovery looks past EOF too.
"""

from __future__ import annotations

from typing import Iterable

from models.blockio import BlockFile, WriteSite, read_exact
from models.qcow2 import spec
from models.qcow2.check.imrt import nonzero_refcounts
from models.qcow2.check.refcounts import _u64s
from models.qcow2.check.result import Finding, Kind
from models.qcow2.geometry import set_refcount
from models.qcow2.header import ParsedHeader, read_header

__all__ = ["extend_to_references", "refcounts_past_eof", "drop_refcounts_past_eof"]


def extend_to_references(file: BlockFile, parsed: ParsedHeader, findings: list[Finding], max_growth: int | None) -> None:
    """Grow the file over data and L2 clusters referenced past its end (QEMU has no such step).

    With lazy refcounts an allocating write is `data, L2, flush`: a crash can keep the L2
    update and lose the growth of the file that the data write caused. The cluster then
    lies past EOF, which reads as zeros, the value it held before the lost write. Growing
    the file with zeros keeps that guest view and turns the reference into one that the
    rebuild can count; without it QEMU's check reports a corruption it cannot fix.
    """
    hdr, geo = parsed.header, parsed.geometry
    cs = geo.cluster_size
    try:
        size = file.size()
        end = 0
        for l1_entry in _u64s(file.pread(hdr.l1_table_offset, hdr.l1_size * 8)):
            l2_off = l1_entry & spec.L1E_OFFSET_MASK
            if not l2_off or not geo.is_aligned(l2_off):
                continue
            end = max(end, l2_off + cs)
            if l2_off >= size:
                continue
            hosts = [e & spec.L2E_OFFSET_MASK for e in _u64s(file.pread(l2_off, cs)) if e and not e & spec.QCOW_OFLAG_COMPRESSED]
            aligned = [h for h in hosts if h and geo.is_aligned(h)]
            if aligned:
                end = max(end, max(aligned) + cs)
    except (OSError, ValueError):
        return
    if end - size < cs or (max_growth is not None and end - size > max_growth):
        return
    file.truncate(end)
    file.flush()
    findings.append(Finding(Kind.EXTENDED, template="Repairing: extended the image to {:#x} to include clusters "
                            "referenced past its end (they read as zeros)", args=(end,)))


def refcounts_past_eof(file: BlockFile, parsed: ParsedHeader | None = None) -> list[int]:
    """Clusters at or past the end of the file whose on-disk refcount is not 0.

    qemu-img check compares only clusters inside the file, so a refcount raised and
    flushed for a cluster whose own write (and the file growth it caused) was then lost
    in a crash stays invisible until the file grows over it, when it turns into a leak.
    """
    return [c for c, _off, _idx in _past_eof_entries(file, parsed)]


def drop_refcounts_past_eof(file: BlockFile, parsed: ParsedHeader | None = None) -> int:
    """Set every refcount past the end of the file to 0 (nothing can reference there); returns how many.

    Each refcount block touched is written once.
    """
    parsed = parsed or read_header(file, writable=True, check_mode=True)
    entries = list(_past_eof_entries(file, parsed))
    if not entries:
        return 0
    cs, order = parsed.geometry.cluster_size, parsed.header.refcount_order
    blocks: dict[int, bytearray] = {}
    for _cluster, block_off, index in entries:
        block = blocks.setdefault(block_off, bytearray(read_exact(file, block_off, cs)))
        set_refcount(block, index, order, 0)
    for block_off, block in sorted(blocks.items()):
        file.pwrite(block_off, bytes(block), WriteSite.REPAIR)
    file.flush()
    return len(entries)


def _past_eof_entries(file: BlockFile, parsed: ParsedHeader | None) -> Iterable[tuple[int, int, int]]:
    """(cluster, refcount block offset, index in the block) of every non-zero refcount at or past EOF."""
    parsed = parsed or read_header(file, writable=False, check_mode=True)
    hdr, geo = parsed.header, parsed.geometry
    cs = geo.cluster_size
    size = file.size()
    first = geo.size_to_clusters(size)
    n = hdr.refcount_table_clusters * cs // 8
    table = _u64s(read_exact(file, hdr.refcount_table_offset, n * 8))
    rbe = geo.refblock_entries
    for ri in range(geo.reftable_index(first), n):
        block_off = table[ri] & spec.REFT_OFFSET_MASK
        if not block_off or not geo.is_aligned(block_off) or block_off >= size:
            continue
        base = ri * rbe
        for idx in nonzero_refcounts(read_exact(file, block_off, cs), hdr.refcount_order, rbe):
            if base + idx >= first:
                yield base + idx, block_off, idx
