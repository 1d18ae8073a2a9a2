"""The snapshot table on disk: one entry per internal snapshot, declared once with the spec's field names and byte ranges."""

from __future__ import annotations

import dataclasses
import struct

from models.blockio import BlockFile, read_exact
from models.qcow2 import spec
from models.qcow2.errors import InvalidImage

# (field, struct code, first byte, last byte) of one entry, as docs/interop/qcow2.txt lists them.
ENTRY_FIELDS: tuple[tuple[str, str, int, int], ...] = (
    ("l1_table_offset", "Q", 0, 7),
    ("l1_size", "I", 8, 11),
    ("id_str_size", "H", 12, 13),
    ("name_size", "H", 14, 15),
    ("date_sec", "I", 16, 19),
    ("date_nsec", "I", 20, 23),
    ("vm_clock_nsec", "Q", 24, 31),
    ("vm_state_size", "I", 32, 35),
    ("extra_data_size", "I", 36, 39),
)
# The extra data that follows (v3 requires at least the first 16 bytes), offsets from the entry start.
EXTRA_FIELDS: tuple[tuple[str, str, int, int], ...] = (
    ("vm_state_size_large", "Q", 40, 47),
    ("disk_size", "Q", 48, 55),
    ("icount", "Q", 56, 63),  # record/replay instruction count; QEMU 7.2's qemu-img writes 0
)
_ENTRY_FORMAT = ">" + "".join(code for _, code, _, _ in ENTRY_FIELDS)
_EXTRA_FORMAT = ">" + "".join(code for _, code, _, _ in EXTRA_FIELDS)
ENTRY_HEADER_SIZE = struct.calcsize(_ENTRY_FORMAT)
EXTRA_SIZE = struct.calcsize(_EXTRA_FORMAT)  # what QEMU 7.2 writes (sizeof(QCowSnapshotExtraData))
assert ENTRY_HEADER_SIZE == 40 and EXTRA_SIZE == 24
for _fields in (ENTRY_FIELDS, EXTRA_FIELDS):
    for _name, _code, _first, _last in _fields:
        assert struct.calcsize(">" + _code) == _last - _first + 1, _name
MAX_EXTRA_DATA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
V3_MIN_EXTRA = 16  # a v3 entry carries at least vm_state_size_large and disk_size


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """One snapshot table entry, decoded."""

    id_str: str
    name: str
    l1_table_offset: int
    l1_size: int
    disk_size: int
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    icount: int = 0
    unknown_extra: bytes = b""  # extra data past the fields QEMU 7.2 knows, kept when the table is rewritten

    def pack(self) -> bytes:
        """The entry as qcow2_write_snapshots writes it: 40-byte header, 24 bytes of extra data, id, name."""
        ident, name = self.id_str.encode(), self.name.encode()
        small_vm_state = self.vm_state_size if self.vm_state_size <= 0xFFFFFFFF else 0
        head = struct.pack(_ENTRY_FORMAT, self.l1_table_offset, self.l1_size, len(ident), len(name), self.date_sec,
                           self.date_nsec, self.vm_clock_nsec, small_vm_state, EXTRA_SIZE + len(self.unknown_extra))
        extra = struct.pack(_EXTRA_FORMAT, self.vm_state_size, self.disk_size, self.icount & (1 << 64) - 1)
        return head + extra + self.unknown_extra + ident + name


def table_bytes(snapshots: list[Snapshot]) -> bytes:
    """The whole table: entries packed back to back, each starting 8-aligned (the last is not padded)."""
    out = bytearray()
    for sn in snapshots:
        out += bytes(-len(out) % 8)
        out += sn.pack()
    return bytes(out)


def read_table(file: BlockFile, nb_snapshots: int, offset: int, *, version: int, disk_size: int,
               cluster_size: int) -> tuple[list[Snapshot], int]:
    """Decode `nb_snapshots` entries at `offset` (QEMU's qcow2_read_snapshots); return them and the table size."""
    path = file.name
    snapshots: list[Snapshot] = []
    pos = offset
    for i in range(nb_snapshots):
        pos += -(pos - offset) % 8
        fields = dict(zip((f for f, _, _, _ in ENTRY_FIELDS),
                          struct.unpack(_ENTRY_FORMAT, read_exact(file, pos, ENTRY_HEADER_SIZE))))
        extra_size = fields["extra_data_size"]
        where = f"snapshot table entry {i}"
        if extra_size > MAX_EXTRA_DATA:
            raise InvalidImage(path, pos + 36, f"{where} extra_data_size", extra_size,
                               f"Too much extra metadata in snapshot table entry {i} (at most {MAX_EXTRA_DATA} bytes)")
        if version >= 3 and extra_size < V3_MIN_EXTRA:
            raise InvalidImage(path, pos + 36, f"{where} extra_data_size", extra_size,
                               f"Snapshot table entry {i} is incomplete (v3 needs at least {V3_MIN_EXTRA} bytes of extra data)")
        extra = read_exact(file, pos + ENTRY_HEADER_SIZE, extra_size)
        padded = extra[:EXTRA_SIZE] + bytes(max(0, EXTRA_SIZE - extra_size))
        vm_large, snap_disk, icount = struct.unpack(_EXTRA_FORMAT, padded)
        body = pos + ENTRY_HEADER_SIZE + extra_size
        raw_id = read_exact(file, body, fields["id_str_size"])
        raw_name = read_exact(file, body + len(raw_id), fields["name_size"])
        l1_off, l1_size = fields["l1_table_offset"], fields["l1_size"]
        if l1_size > spec.QCOW_MAX_L1_SIZE // 8:
            raise InvalidImage(path, pos + 8, f"{where} l1_size", l1_size, "Snapshot L1 table too large")
        if l1_off % cluster_size or (1 << 63) - 1 - l1_size * 8 < l1_off:
            raise InvalidImage(path, pos, f"{where} l1_table_offset", l1_off, "Snapshot L1 table offset invalid")
        snapshots.append(Snapshot(
            id_str=raw_id.decode("utf-8", "replace"), name=raw_name.decode("utf-8", "replace"),
            l1_table_offset=l1_off, l1_size=l1_size,
            disk_size=snap_disk if extra_size >= 16 else disk_size,
            date_sec=fields["date_sec"], date_nsec=fields["date_nsec"], vm_clock_nsec=fields["vm_clock_nsec"],
            vm_state_size=vm_large if extra_size >= 8 else fields["vm_state_size"],
            icount=(icount if icount < 1 << 63 else icount - (1 << 64)) if extra_size >= 24 else -1,
            unknown_extra=bytes(extra[EXTRA_SIZE:])))
        pos = body + len(raw_id) + len(raw_name)
    return snapshots, pos - offset
