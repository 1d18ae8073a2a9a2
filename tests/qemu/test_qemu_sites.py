"""Write-site classification of converted blklogwrites logs: the image's layout at each point names what a write updates."""

from __future__ import annotations

import struct

import pytest

from harness.targets.qemu.blklog import Entry
from harness.targets.qemu.hostlog import Converter
from harness.targets.qemu.layout import Role, guest_allocated, read_layout, refcounts_past_eof
from models.blockio import WriteSite
from models.qcow2.image import Qcow2Image
from models.blockio import MemoryFile

CS = 4096


def _fresh(lazy: bool = True) -> bytes:
    # qcrash's own create is byte-compatible with qemu-img create (tests/interop), and needs no QEMU here.
    f = MemoryFile()
    Qcow2Image.create(f, 4 << 20, cluster_size=CS, lazy_refcounts=lazy)
    return f.getvalue()


def _entry(i: int, offset: int, data: bytes = b"", flags: int = 0, length: int | None = None) -> Entry:
    return Entry(i, offset, len(data) if length is None else length, flags, data)


def test_fresh_layout_roles() -> None:
    layout = read_layout(_fresh())
    assert layout is not None
    assert [layout.roles.get(c) for c in range(4)] == [Role.HEADER, Role.REFTABLE, Role.REFBLOCK, Role.L1]


def test_allocating_write_sites_are_named_by_what_links_them_in() -> None:
    base = _fresh()
    conv = Converter(base)
    l1 = bytearray(base[3 * CS:3 * CS + 512])
    l1[0:8] = struct.pack(">Q", (1 << 63) | 4 * CS)
    l2 = bytearray(CS)
    l2[0:8] = struct.pack(">Q", (1 << 63) | 5 * CS)
    header = bytearray(base[:512])
    header[79] |= 1
    conv.feed([
        _entry(0, 4 * CS, bytes(CS)),          # a new L2 table, not yet linked in
        _entry(1, 0, flags=1),
        _entry(2, 3 * CS, bytes(l1)),          # the L1 entry links it in: entry 0 was an L2 allocation
        _entry(3, 5 * CS, b"\x5a" * CS),       # data, linked in by the L2 update below
        _entry(4, 0, bytes(header)),           # mark_dirty's 8-byte write as a 512-byte read-modify-write
        _entry(5, 4 * CS, bytes(l2)),
        _entry(6, 8 * CS, length=CS, flags=4),  # a discard past EOF changes nothing
    ])
    sites = [op.site for op in conv.log]
    assert sites == [WriteSite.L2_ALLOC, WriteSite.OTHER, WriteSite.L1, WriteSite.DATA, WriteSite.DIRTY_BIT,
                     WriteSite.L2]
    assert guest_allocated(conv.image) == (0,)


def test_header_sites() -> None:
    base = _fresh()
    conv = Converter(base)
    switch = bytearray(base[:512])
    switch[48:56] = struct.pack(">Q", 7 * CS)
    clean = bytearray(base[:CS])
    conv.feed([_entry(0, 0, bytes(switch)), _entry(1, 0, bytes(clean))])
    assert [op.site for op in conv.log] == [WriteSite.REFTABLE_SWITCH, WriteSite.HEADER]


def test_unlinked_writes_settle_as_data_and_size_changes_become_truncates() -> None:
    conv = Converter(_fresh())
    conv.feed([_entry(0, 9 * CS, b"\x11" * 512)])
    conv.settle()
    assert conv.log[0].site is WriteSite.DATA and conv.log[0].size_after == 9 * CS + 512
    conv.reconcile(10 * CS)
    assert conv.log[1].kind == "truncate" and conv.log[1].offset == 10 * CS


@pytest.mark.parametrize("bits", [1, 4, 16, 64])
def test_refcounts_past_eof(bits: int) -> None:
    f = MemoryFile()
    Qcow2Image.create(f, 4 << 20, cluster_size=CS, refcount_bits=bits)
    image = bytearray(f.getvalue())
    assert refcounts_past_eof(image) == ()
    # Cut the file to two clusters: the refblock (cluster 2) and L1 (cluster 3) still count themselves.
    assert refcounts_past_eof(image[:2 * CS]) == ()  # the reftable entry's refblock lies past EOF: not read
    image = image[:3 * CS]
    assert refcounts_past_eof(image) == (3,)
