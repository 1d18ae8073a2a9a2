"""The blklogwrites log format: parse QEMU's dm-log-writes style log into entries, with a named error for every bad field.

Layout (qcow2-facts.md section 4.3; all fields little-endian, sizes in log sectors):

    sector 0   super block: u64 magic 0x6a736677736872, u64 version 1, u64 nr_entries, u32 sectorsize
    sector 1.. entries: u64 sector, u64 nr_sectors, u64 flags, u64 data_len (32 bytes, padded
               to one sector), followed by nr_sectors sectors of data (none for DISCARD)

Hazards this parser handles on purpose:

- QEMU updates the super block's `nr_entries` only on a FLUSH entry (or every
  `log-super-update-interval` entries), so a live log or one from a run that ended
  without a flush has valid entries past `nr_entries`. We scan until the first all-zero
  entry header or the end of the file, and report `nr_entries` separately.
- The super block is all zeros until the first FLUSH entry is logged (cache=unsafe never
  writes it). An all-zero super block is accepted as "not written yet"; anything else
  that is not the magic is an error.
- QEMU writes the data of an entry after its header, so a log read while QEMU is writing
  may end inside an entry; `parse(..., partial_ok=True)` stops before such a tail.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

__all__ = ["MAGIC", "Flag", "Entry", "BlkLog", "BlkLogError", "parse", "parse_file"]

MAGIC = 0x6A736677736872
VERSION = 1
SUPER = struct.Struct("<QQQI")
ENTRY = struct.Struct("<QQQQ")


class Flag(enum.IntFlag):
    """Entry flags; QEMU emits only FLUSH, DISCARD or none (FUA and MARK come from Linux's dm-log-writes)."""

    FLUSH = 1
    FUA = 2
    DISCARD = 4
    MARK = 8
    METADATA = 16


_KNOWN_FLAGS = 0x1F


class BlkLogError(ValueError):
    """A blklogwrites log breaks a rule: names the file, the byte offset, the field, its value and the rule."""

    def __init__(self, file: str, offset: int, field: str, value: object, rule: str) -> None:
        self.file, self.offset, self.field, self.value, self.rule = file, offset, field, value, rule
        shown = f"{value:#x}" if isinstance(value, int) else repr(value)
        super().__init__(f"{file}: offset {offset:#x}: {field} = {shown}: {rule}")


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One logged host operation: byte offset and length on the image file, flags, and the written bytes."""

    index: int
    offset: int
    length: int
    flags: int
    data: bytes

    @property
    def is_flush(self) -> bool:
        return bool(self.flags & Flag.FLUSH)

    @property
    def is_discard(self) -> bool:
        return bool(self.flags & Flag.DISCARD)


@dataclasses.dataclass(frozen=True, slots=True)
class BlkLog:
    """A parsed log: the super block's claims and every entry found by scanning."""

    sector_size: int
    nr_entries: int  # what the super block says (lags behind the scan; 0 when never written)
    entries: tuple[Entry, ...]
    end: int  # byte offset just past the last parsed entry: where the next one will start


def parse(data: bytes, *, name: str = "<log>", sector_size: int = 512, partial_ok: bool = False,
          start: int = 0, first_index: int = 0) -> BlkLog:
    """Parse a whole log (or, from byte `start`, the entries appended since an earlier parse)."""
    if len(data) < SUPER.size:
        if partial_ok or not data:
            return BlkLog(sector_size, 0, (), start or sector_size)
        raise BlkLogError(name, 0, "super block", len(data), f"a log holds at least a {SUPER.size}-byte super block")
    magic, version, nr_entries, ss = SUPER.unpack_from(data, 0)
    if magic == 0 and version == 0 and nr_entries == 0 and ss == 0:
        ss = sector_size  # super block not written yet: QEMU writes it at the first FLUSH
    elif magic != MAGIC:
        raise BlkLogError(name, 0, "magic", magic, f"must be {MAGIC:#x} (dm-log-writes)")
    elif version != VERSION:
        raise BlkLogError(name, 8, "version", version, f"must be {VERSION}")
    if ss < 512 or ss & (ss - 1):
        raise BlkLogError(name, 24, "sectorsize", ss, "must be a power of two of at least 512")
    entries, end = scan(data, name=name, sector_size=ss, base=0, start=start or ss, first_index=first_index,
                        partial_ok=partial_ok)
    return BlkLog(ss, nr_entries, tuple(entries), end)


def scan(data: bytes, *, name: str, sector_size: int, base: int, start: int | None = None, first_index: int = 0,
         partial_ok: bool = False) -> tuple[list[Entry], int]:
    """Parse entries from `data`, which holds the log's bytes from file offset `base` on.

    Scanning starts at file offset `start` (default `base`) and stops at an all-zero entry
    header or the end of `data`. Returns the entries and the file offset just past the last one.
    """
    ss = sector_size
    entries: list[Entry] = []
    cur = base if start is None else start
    index = first_index
    while cur - base + ENTRY.size <= len(data):
        sector, nsec, flags, dlen = ENTRY.unpack_from(data, cur - base)
        if sector == nsec == flags == dlen == 0:
            break  # end of the log: QEMU never truncates, but a fresh log file is empty beyond here
        _check_entry(name, cur, sector, nsec, flags, dlen)
        body = 0 if flags & Flag.DISCARD else nsec * ss
        lo = cur - base + ss
        if lo + body > len(data):
            if partial_ok:
                break
            raise BlkLogError(name, cur, "nr_sectors", nsec,
                              f"entry data runs past the end of the log ({base + len(data)} bytes)")
        entries.append(Entry(index, sector * ss, nsec * ss, flags, bytes(data[lo:lo + body])))
        index += 1
        cur += ss + body
    return entries, cur


def _check_entry(name: str, at: int, sector: int, nsec: int, flags: int, dlen: int) -> None:
    if flags & ~_KNOWN_FLAGS:
        raise BlkLogError(name, at + 16, "flags", flags, f"unknown bits; known are {_KNOWN_FLAGS:#x}")
    if flags & (Flag.MARK | Flag.FUA | Flag.METADATA):
        raise BlkLogError(name, at + 16, "flags", flags, "QEMU emits only FLUSH (1) and DISCARD (4)")
    if dlen:
        raise BlkLogError(name, at + 24, "data_len", dlen, "must be 0 (QEMU logs no inline data)")
    if flags & Flag.FLUSH and (sector or nsec):
        raise BlkLogError(name, at, "sector", sector, "a FLUSH entry has sector = nr_sectors = 0")
    if not flags & Flag.FLUSH and nsec == 0:
        raise BlkLogError(name, at + 8, "nr_sectors", nsec, "a write or discard entry covers at least one sector")
    if sector + nsec >= 1 << 55:
        raise BlkLogError(name, at, "sector", sector, "the range must fit a 64-bit byte offset")


def parse_file(path: str, **kwargs) -> BlkLog:
    """Read and parse a log file."""
    with open(path, "rb") as f:
        return parse(f.read(), name=path, **kwargs)
