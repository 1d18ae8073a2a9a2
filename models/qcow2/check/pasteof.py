"""qcrash's deviations from QEMU at the end of the file: growing it over clusters referenced past EOF, and refcounts past EOF.

QEMU's check compares only clusters inside the file. With lazy refcounts a crash can
lose the growth of the file that a data write caused while keeping the L2 update, or
keep a flushed refcount for a cluster whose own write was lost; the crash contract asks
that every refcount equal the references, so qcrash's recovery looks past EOF too.
"""

from __future__ import annotations

import itertools
from typing import Iterator

from models.blockio import BlockFile, WriteSite, read_exact
from models.qcow2 import spec
from models.qcow2.check.imrt import nonzero_refcounts, nonzero_subbyte
from models.qcow2.check.result import Finding, Kind
from models.qcow2.check.state import l1_bytes_in_file
from models.qcow2.geometry import set_refcount
from models.qcow2.header import ParsedHeader, read_header
from models.qcow2.scan import nonzero_u64_items, u64_array, zero_from

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
        l1 = u64_array(file.pread(hdr.l1_table_offset, l1_bytes_in_file(size, hdr.l1_table_offset, hdr.l1_size)))
        for l1_entry in itertools.compress(l1, l1):  # the zero entries (and those past EOF) skipped in C
            l2_off = l1_entry & spec.L1E_OFFSET_MASK
            if not l2_off or not geo.is_aligned(l2_off):
                continue
            end = max(end, l2_off + cs)
            if l2_off >= size:
                continue
            hosts = [e & spec.L2E_OFFSET_MASK for _i, e in nonzero_u64_items(file.pread(l2_off, cs))
                     if not e & spec.QCOW_OFLAG_COMPRESSED]
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
    out: list[int] = []
    for base, _block_off, _block, _first, past in _past_eof_blocks(file, parsed):
        out.extend(base + index for index in past)
    return out


def drop_refcounts_past_eof(file: BlockFile, parsed: ParsedHeader | None = None) -> int:
    """Set every refcount past the end of the file to 0 (nothing can reference there); returns how many.

    Each refcount block touched is written once, in offset order, with its tail past EOF
    zeroed in one slice.
    """
    parsed = parsed or read_header(file, writable=True, check_mode=True)
    order = parsed.header.refcount_order
    dropped = 0
    blocks: dict[int, bytearray] = {}
    for _base, block_off, block, first, past in _past_eof_blocks(file, parsed):
        dropped += len(past)
        _zero_entries_from(blocks.setdefault(block_off, block), first, order)
    for block_off, block in sorted(blocks.items()):
        file.pwrite(block_off, bytes(block), WriteSite.REPAIR)
    if blocks:
        file.flush()
    return dropped


def _zero_entries_from(block: bytearray, first: int, order: int) -> None:
    """Entries [first, end) of a refcount block become 0: whole bytes in one slice, a shared byte entry by entry."""
    if order >= 3:
        whole = first * (1 << (order - 3))
    else:
        per_byte = 8 >> order
        whole = -(-first // per_byte)
        for index in range(first, whole * per_byte):
            set_refcount(block, index, order, 0)
    block[whole:] = bytes(len(block) - whole)


def _past_eof_blocks(file: BlockFile, parsed: ParsedHeader | None) -> Iterator[tuple[int, int, bytearray, int, list[int]]]:
    """For every refcount block inside the file that covers clusters at or past EOF and holds a non-zero
    entry there: (first cluster it covers, its offset, its bytes, the index of the first entry past EOF,
    the indices of the non-zero entries from there on).

    A block whose bytes from the one holding that first entry on are all zero is skipped
    (with 2 MiB clusters a block holds up to 16 million entries, and nearly every tail
    past EOF is zeros); in the others only the non-zero bytes are decoded."""
    parsed = parsed or read_header(file, writable=False, check_mode=True)
    hdr, geo = parsed.header, parsed.geometry
    cs = geo.cluster_size
    size = file.size()
    eof_cluster = geo.size_to_clusters(size)
    n = hdr.refcount_table_clusters * cs // 8
    rbe = geo.refblock_entries
    start = geo.reftable_index(eof_cluster)
    # Only the non-zero entries, found and decoded in C (a 2 MiB-cluster reftable holds 262,144
    # entries: decoding every one at each recovery was a twentieth of such an example).
    for ri, entry in nonzero_u64_items(read_exact(file, hdr.refcount_table_offset, n * 8)):
        if ri < start:
            continue
        block_off = entry & spec.REFT_OFFSET_MASK
        if not block_off or not geo.is_aligned(block_off) or block_off >= size:
            continue
        base = ri * rbe
        raw = read_exact(file, block_off, cs)
        first = max(0, eof_cluster - base)
        tail_byte = (first << hdr.refcount_order) // 8  # the byte holding entry `first`
        if zero_from(raw, tail_byte):
            continue
        past = _nonzero_from(raw, hdr.refcount_order, first, rbe)
        if past:
            yield base, block_off, bytearray(raw), first, past


def _nonzero_from(raw: bytes, order: int, first: int, entries: int) -> list[int]:
    """Indices in [first, entries) of the non-zero entries of a refcount block."""
    if order < 3:
        return nonzero_subbyte(raw, order, first, entries)
    width = 1 << (order - 3)
    return [first + i for i in nonzero_refcounts(raw[first * width:], order, entries - first)]
