"""Constants of the qcow2 format (docs/interop/qcow2.txt, QEMU block/qcow2.h): magic, feature bits, entry masks, limits."""

from __future__ import annotations

import enum

QCOW_MAGIC = 0x514649FB  # "QFI\xfb"

MIN_CLUSTER_BITS = 9  # 512 B
MAX_CLUSTER_BITS = 21  # 2 MiB
MAX_REFCOUNT_ORDER = 6  # 64-bit refcounts

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112  # what QEMU writes: 104 + compression_type + 7 bytes padding

QCOW_MAX_L1_SIZE = 32 * 1024 * 1024  # bytes
QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024  # bytes
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_CLUSTER_OFFSET = (1 << 56) - 1


class IncompatFeature(enum.IntFlag):
    """incompatible_features (header bytes 72-79): an unknown bit must refuse the open."""

    DIRTY = 1 << 0  # refcounts may be inconsistent; repair before use
    CORRUPT = 1 << 1  # structures may be corrupt; no writes except repair
    EXTERNAL_DATA_FILE = 1 << 2
    COMPRESSION_TYPE = 1 << 3
    EXTENDED_L2 = 1 << 4


class CompatFeature(enum.IntFlag):
    """compatible_features (header bytes 80-87): unknown bits may be ignored."""

    LAZY_REFCOUNTS = 1 << 0


class AutoclearFeature(enum.IntFlag):
    """autoclear_features (header bytes 88-95): a writer clears bits it does not know."""

    BITMAPS = 1 << 0
    RAW_EXTERNAL = 1 << 1


INCOMPAT_MASK = (
    IncompatFeature.DIRTY
    | IncompatFeature.CORRUPT
    | IncompatFeature.EXTERNAL_DATA_FILE
    | IncompatFeature.COMPRESSION_TYPE
    | IncompatFeature.EXTENDED_L2
)
# What qcrash implements; the rest of INCOMPAT_MASK is refused by name.
INCOMPAT_SUPPORTED = IncompatFeature.DIRTY | IncompatFeature.CORRUPT
AUTOCLEAR_MASK = AutoclearFeature.BITMAPS | AutoclearFeature.RAW_EXTERNAL

# The bits that every open and check tests, as plain ints: `int & IntFlag` goes through enum's
# Flag.__and__ and builds a flag object (about a microsecond; 2.6% of a dev-mix sweep's judging).
DIRTY_BIT = int(IncompatFeature.DIRTY)
CORRUPT_BIT = int(IncompatFeature.CORRUPT)
EXTERNAL_DATA_FILE_BIT = int(IncompatFeature.EXTERNAL_DATA_FILE)
COMPRESSION_TYPE_BIT = int(IncompatFeature.COMPRESSION_TYPE)
EXTENDED_L2_BIT = int(IncompatFeature.EXTENDED_L2)
LAZY_REFCOUNTS_BIT = int(CompatFeature.LAZY_REFCOUNTS)
BITMAPS_BIT = int(AutoclearFeature.BITMAPS)
RAW_EXTERNAL_BIT = int(AutoclearFeature.RAW_EXTERNAL)

# Feature-name table entries in the order QEMU writes them (qcow2_update_header).
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
FEATURE_TABLE_ENTRY_SIZE = 48

# L1 entry: bits 9-55 hold the L2 table offset; 63 is COPIED.
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
# L2 entry (standard descriptor).
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
# Refcount table entry: bits 9-63 hold the refblock offset.
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

# Import-time proof that each offset mask and its reserved mask split the flag-free bits exactly.
assert L1E_OFFSET_MASK & L1E_RESERVED_MASK == 0
assert L1E_OFFSET_MASK | L1E_RESERVED_MASK | QCOW_OFLAG_COPIED == (1 << 64) - 1
assert L2E_OFFSET_MASK & L2E_STD_RESERVED_MASK == 0
assert (
    L2E_OFFSET_MASK | L2E_STD_RESERVED_MASK | QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO
    == (1 << 64) - 1
)
assert REFT_OFFSET_MASK | REFT_RESERVED_MASK == (1 << 64) - 1
