"""On-disk structures declared once, in the spec's field names with their byte ranges: the header and its extensions."""

from __future__ import annotations

import dataclasses
import struct

from models.qcow2 import spec

# (field, struct code, first byte, last byte) exactly as docs/interop/qcow2.txt lists them.
HEADER_FIELDS: tuple[tuple[str, str, int, int], ...] = (
    ("magic", "I", 0, 3),
    ("version", "I", 4, 7),
    ("backing_file_offset", "Q", 8, 15),
    ("backing_file_size", "I", 16, 19),
    ("cluster_bits", "I", 20, 23),
    ("size", "Q", 24, 31),
    ("crypt_method", "I", 32, 35),
    ("l1_size", "I", 36, 39),
    ("l1_table_offset", "Q", 40, 47),
    ("refcount_table_offset", "Q", 48, 55),
    ("refcount_table_clusters", "I", 56, 59),
    ("nb_snapshots", "I", 60, 63),
    ("snapshots_offset", "Q", 64, 71),
    # version 3 and later
    ("incompatible_features", "Q", 72, 79),
    ("compatible_features", "Q", 80, 87),
    ("autoclear_features", "Q", 88, 95),
    ("refcount_order", "I", 96, 99),
    ("header_length", "I", 100, 103),
    ("compression_type", "B", 104, 104),
)
_V2_FIELDS = HEADER_FIELDS[:13]
_V2_FORMAT = ">" + "".join(code for _, code, _, _ in _V2_FIELDS)
_V3_FORMAT = ">" + "".join(code for _, code, _, _ in HEADER_FIELDS[:18])
assert struct.calcsize(_V2_FORMAT) == spec.V2_HEADER_LENGTH
assert struct.calcsize(_V3_FORMAT) == spec.V3_MIN_HEADER_LENGTH
for _name, _code, _first, _last in HEADER_FIELDS:
    assert struct.calcsize(">" + _code) == _last - _first + 1, _name

FIELD_OFFSET = {name: first for name, _, first, _ in HEADER_FIELDS}


@dataclasses.dataclass(slots=True)
class Header:
    """The qcow2 header (cluster 0). Version 2 images read as if the v3 fields held their defaults."""

    magic: int = spec.QCOW_MAGIC
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = spec.V3_HEADER_LENGTH
    compression_type: int = 0

    @classmethod
    def unpack(cls, raw: bytes) -> "Header":
        """Decode the fixed fields; `raw` must hold at least 104 bytes (callers pad short files with zeros)."""
        values = struct.unpack_from(_V2_FORMAT, raw, 0)
        hdr = cls(*values, header_length=spec.V2_HEADER_LENGTH, refcount_order=4)
        if hdr.version >= 3:
            v3 = struct.unpack_from(_V3_FORMAT, raw, 0)[13:]
            (hdr.incompatible_features, hdr.compatible_features, hdr.autoclear_features,
             hdr.refcount_order, hdr.header_length) = v3
            hdr.compression_type = raw[104] if hdr.header_length > 104 and len(raw) > 104 else 0
        return hdr

    def pack(self) -> bytes:
        """Encode exactly `header_length` bytes (72 for v2)."""
        values = [getattr(self, name) for name, _, _, _ in HEADER_FIELDS]
        if self.version < 3:
            return struct.pack(_V2_FORMAT, *values[:13])
        out = bytearray(struct.pack(_V3_FORMAT, *values[:18]))
        if self.header_length > 104:
            out.append(self.compression_type)
            out.extend(bytes(self.header_length - len(out)))
        return bytes(out)

    def field_bytes(self, *names: str) -> tuple[int, bytes]:
        """The byte range covering the named consecutive fields, for small in-place header updates."""
        full = self.pack()
        spans = [(first, last) for n, _, first, last in HEADER_FIELDS if n in names]
        start, end = min(s for s, _ in spans), max(e for _, e in spans) + 1
        return start, full[start:end]

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order


@dataclasses.dataclass(frozen=True, slots=True)
class HeaderExtension:
    """One header extension: u32 type, u32 length, data, zero padding to a multiple of 8."""

    type: int
    data: bytes
    offset: int = 0  # where it was found, for error messages

    def pack(self) -> bytes:
        pad = (-len(self.data)) % 8
        return struct.pack(">II", self.type, len(self.data)) + self.data + bytes(pad)


def feature_table_extension() -> HeaderExtension:
    """The feature-name table QEMU writes when cluster_size > 4096: 8 entries of 48 bytes."""
    entries = b"".join(
        struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in spec.FEATURE_NAMES
    )
    return HeaderExtension(spec.EXT_FEATURE_TABLE, entries)


def parse_feature_table(data: bytes) -> dict[tuple[int, int], str]:
    names = {}
    for pos in range(0, len(data) - spec.FEATURE_TABLE_ENTRY_SIZE + 1, spec.FEATURE_TABLE_ENTRY_SIZE):
        kind, bit, raw = struct.unpack_from(">BB46s", data, pos)
        names[(kind, bit)] = raw.rstrip(b"\0").decode("utf-8", "replace")
    return names
