"""The blklogwrites log parser: entries, the lagging super block, and a named error for every bad field."""

from __future__ import annotations

import struct

import pytest

from harness.targets.qemu.blklog import MAGIC, BlkLogError, parse, scan

SS = 512


def _log(entries: list[tuple[int, int, int, bytes]], *, nr: int | None = None, super_written: bool = True) -> bytes:
    """A log: (sector, nr_sectors, flags, data) entries after a super block."""
    head = struct.pack("<QQQI", MAGIC, 1, len(entries) if nr is None else nr, SS) if super_written else b""
    out = bytearray(head.ljust(SS, b"\0"))
    for sector, nsec, flags, data in entries:
        out += struct.pack("<QQQQ", sector, nsec, flags, 0).ljust(SS, b"\0")
        out += data
    return bytes(out)


def test_entries_write_flush_discard() -> None:
    raw = _log([(2, 1, 0, b"\x11" * SS), (0, 0, 1, b""), (8, 4, 4, b""), (1, 2, 0, b"\x22" * (2 * SS))])
    log = parse(raw)
    assert [(e.offset, e.length, e.flags) for e in log.entries] == [(1024, 512, 0), (0, 0, 1), (4096, 2048, 4),
                                                                     (512, 1024, 0)]
    assert log.entries[0].data == b"\x11" * SS and log.entries[2].data == b"" and log.entries[2].is_discard
    assert log.end == len(raw)


def test_entries_past_nr_entries_are_found() -> None:
    # QEMU rewrites nr_entries only at FLUSH entries: the scan, not the count, is the truth.
    log = parse(_log([(2, 1, 0, b"\x11" * SS), (0, 0, 1, b""), (3, 1, 0, b"\x33" * SS)], nr=2))
    assert log.nr_entries == 2 and len(log.entries) == 3


def test_unwritten_super_block_is_accepted() -> None:
    raw = _log([(2, 1, 0, b"\x11" * SS)], super_written=False)
    assert raw[:SS] == bytes(SS)  # QEMU writes the super block at the first FLUSH entry only
    log = parse(raw)
    assert log.nr_entries == 0 and len(log.entries) == 1


def test_incremental_scan_continues_where_it_stopped() -> None:
    raw = _log([(2, 1, 0, b"\x11" * SS), (0, 0, 1, b""), (3, 1, 0, b"\x33" * SS)])
    first = parse(raw[:SS * 3])
    assert len(first.entries) == 1
    rest, end = scan(raw[first.end:], name="x", sector_size=SS, base=first.end, first_index=1)
    assert [e.index for e in rest] == [1, 2] and end == len(raw)


@pytest.mark.parametrize("mutate, field", [
    (lambda raw: b"\x01" + raw[1:], "magic"),
    (lambda raw: raw[:8] + struct.pack("<Q", 2) + raw[16:], "version"),
    (lambda raw: raw[:24] + struct.pack("<I", 100) + raw[28:], "sectorsize"),
    (lambda raw: raw[:SS + 16] + struct.pack("<Q", 64) + raw[SS + 24:], "flags"),
    (lambda raw: raw[:SS + 16] + struct.pack("<Q", 8) + raw[SS + 24:], "flags"),
    (lambda raw: raw[:SS + 24] + struct.pack("<Q", 5) + raw[SS + 32:], "data_len"),
    (lambda raw: raw[:SS + 8] + struct.pack("<Q", 9) + raw[SS + 16:], "nr_sectors"),
])
def test_bad_fields_are_named(mutate, field) -> None:
    raw = _log([(2, 1, 0, b"\x11" * SS)])
    with pytest.raises(BlkLogError) as err:
        parse(mutate(raw), name="t.log")
    assert err.value.field == field and err.value.file == "t.log"
    assert "t.log: offset" in str(err.value) and err.value.rule


def test_partial_tail_is_an_error_unless_allowed() -> None:
    raw = _log([(2, 2, 0, b"\x11" * (2 * SS))])[:-SS]
    with pytest.raises(BlkLogError, match="runs past the end"):
        parse(raw)
    assert parse(raw, partial_ok=True).entries == ()
