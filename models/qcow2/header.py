"""Reading, validating and rewriting cluster 0: the header, its extensions, and QEMU's open-time checks (§2.7)."""

from __future__ import annotations

import dataclasses
import struct

import xxhash

from models.blockio import BlockFile, read_exact
from models.qcow2 import spec
from models.qcow2.errors import InvalidImage, UnsupportedFeature
from models.qcow2.geometry import Geometry, geometry_of
from models.qcow2.structs import FIELD_OFFSET, Header, HeaderExtension, feature_table_extension, parse_feature_table

_FEATURE_KINDS = {0: "incompatible", 1: "compatible", 2: "autoclear"}


@dataclasses.dataclass
class ParsedHeader:
    header: Header
    extensions: list[HeaderExtension]
    feature_names: dict[tuple[int, int], str]

    @property
    def geometry(self) -> Geometry:
        return geometry_of(self.header.cluster_bits, self.header.refcount_order)


_SNAPSHOT_HEADER_SIZE = 40  # sizeof(QCowSnapshotHeader)
_MAX_BACKING_NAME = 1023
_BACKING_FORMAT_MAX = 16  # sizeof(bs->backing_format)
_CRYPTO_EXT_SIZE = 16
_INT_MAX = (1 << 31) - 1
_QEMU_INCOMPAT_MASK = int(spec.INCOMPAT_MASK)
_EXTENSIONS_READ = 65536  # cluster 0 read at once for the extensions (all of it up to 64 KiB clusters)


def read_header(file: BlockFile, *, writable: bool, check_mode: bool = False) -> ParsedHeader:
    """Read and validate cluster 0 in the order of QEMU 7.2's qcow2_do_open, with its messages.

    Every rule QEMU applies is applied here first, so an image QEMU refuses is refused
    with QEMU's words; only then does qcrash refuse the features it does not implement
    (encryption, backing files, snapshots, external data, extended L2, zstd).
    """
    # The file's size is what a read from 0 returns short of the header, not file.size():
    # a read-only open then depends on the bytes it read and nothing else (the python
    # target's read plans are keyed by exactly that, harness/targets/python.py).
    raw = file.pread(0, spec.V3_HEADER_LENGTH)
    key = (bytes(raw), writable, check_mode, _EXTENSIONS_READ) if _MEMO else None
    known = _known.get(key) if key is not None else None
    blob = None
    if known is not None:
        # This header passed every rule before, with no backing file name and its extension chain
        # inside the first read of cluster 0: the parse reads that range next, and nothing else.
        length, digest, parsed = known
        blob = read_exact(file, 0, length)
        if xxhash.xxh3_128_digest(blob) == digest:
            _stats["hits"] += 1
            return _copy_of(parsed, raw)
    _stats["misses"] += 1
    parsed, first_read = _parse(file, raw, writable, check_mode, blob)
    if key is not None and first_read is not None:
        if len(_known) >= _MEMO_ENTRIES:
            _known.clear()
        _known[key] = (len(first_read), xxhash.xxh3_128_digest(first_read), parsed)
        parsed = _copy_of(parsed, raw)
    return parsed


# read_header's memo. An open reads the header (112 bytes), then cluster 0 up to _EXTENSIONS_READ for
# the extension chain, and parses both: about 15 us, a tenth of a dev-mix sweep whose states open the
# same header again and again. A header that passed every rule, without a backing file name and with
# its chain inside that first read, is remembered with the read's length and XXH3-128 digest; an open
# that reads the same header and the same range gets a fresh copy of the result (callers change the
# Header they are given: dirty bit, table offsets). Same reads, in the same order, as the parse; a
# digest collision would give another cluster 0's extensions (2**-128, as the judge's memos accept).
_MEMO = True
_MEMO_ENTRIES = 1024  # then cleared whole
_known: dict[tuple, tuple[int, bytes, ParsedHeader]] = {}
_stats = {"hits": 0, "misses": 0}


def _copy_of(parsed: ParsedHeader, raw: bytes) -> ParsedHeader:
    """A remembered header as a caller may change it: its Header decoded again from `raw`, its list and dict copied
    (the extensions themselves are frozen)."""
    return ParsedHeader(Header.unpack(_padded(raw)), list(parsed.extensions), dict(parsed.feature_names))


def _padded(raw: bytes) -> bytes:
    # a v2 header may end with the file (read_exact pads zeros)
    return raw + bytes(spec.V3_HEADER_LENGTH - len(raw)) if len(raw) < spec.V3_HEADER_LENGTH else raw


def _parse(file: BlockFile, raw: bytes, writable: bool, check_mode: bool,
           blob: bytes | None) -> tuple[ParsedHeader, bytes | None]:
    """read_header's rules on the header `raw`; `blob`: the extensions' first read, when made already.

    Returns the parsed header and that first read when the parse made no other read after it (the
    memo's condition), else None.
    """
    path = file.name
    if len(raw) < spec.V2_HEADER_LENGTH:
        raise InvalidImage(path, 0, "file size", len(raw), f"too short for a qcow2 header ({spec.V2_HEADER_LENGTH} bytes)")
    hdr = Header.unpack(_padded(raw))

    def bad(field: str, rule: str, value: object | None = None) -> InvalidImage:
        return InvalidImage(path, FIELD_OFFSET.get(field), field, getattr(hdr, field) if value is None else value, rule)

    if hdr.magic != spec.QCOW_MAGIC:
        raise bad("magic", "Image is not in qcow2 format (magic must be 0x514649fb)")
    if hdr.version not in (2, 3):
        raise bad("version", "Unsupported qcow2 version (must be 2 or 3)")
    if not spec.MIN_CLUSTER_BITS <= hdr.cluster_bits <= spec.MAX_CLUSTER_BITS:
        raise bad("cluster_bits", f"Unsupported cluster size: 2^{hdr.cluster_bits} (cluster_bits must be 9..21)")
    cs = 1 << hdr.cluster_bits
    if hdr.version >= 3:
        if hdr.header_length < spec.V3_MIN_HEADER_LENGTH:
            raise bad("header_length", "qcow2 header too short (v3 needs at least 104 bytes)")
        # QEMU does not require a multiple of 8 (the spec asks for it): neither does qcrash.
        if hdr.header_length > cs:
            raise bad("header_length", f"qcow2 header exceeds cluster size ({cs:#x})")
    if hdr.backing_file_offset > cs:
        raise bad("backing_file_offset", f"Invalid backing file offset (must be <= cluster size {cs:#x})")
    _check_compression_type(path, hdr)
    _check_features(path, file, hdr, writable=writable, check_mode=check_mode)
    if hdr.version >= 3 and hdr.refcount_order > spec.MAX_REFCOUNT_ORDER:
        raise bad("refcount_order", "must be at most 6 (64-bit refcounts)")
    if hdr.refcount_table_clusters == 0 and not check_mode:
        raise bad("refcount_table_clusters", "Image does not contain a reference count table")
    _validate_table(path, "refcount_table_offset", "Reference count table", hdr.refcount_table_offset,
                    hdr.refcount_table_clusters * cs // 8, 8, spec.QCOW_MAX_REFTABLE_SIZE, cs)
    if not check_mode:
        _validate_table(path, "snapshots_offset", "Snapshot table", hdr.snapshots_offset, hdr.nb_snapshots,
                        _SNAPSHOT_HEADER_SIZE, _SNAPSHOT_HEADER_SIZE * spec.QCOW_MAX_SNAPSHOTS, cs)
    _validate_table(path, "l1_table_offset", "Active L1 table", hdr.l1_table_offset, hdr.l1_size, 8,
                    spec.QCOW_MAX_L1_SIZE, cs)
    geo = geometry_of(hdr.cluster_bits, hdr.refcount_order)
    need = geo.size_to_l1(hdr.size)
    if need > _INT_MAX:
        raise bad("size", f"Image is too big (the virtual size needs {need} L1 entries, more than INT_MAX)")
    if hdr.l1_size < need:
        raise bad("l1_size", f"L1 table is too small (the virtual size {hdr.size:#x} needs {need} entries)")
    exts, names, first_read, more = _read_extensions(file, hdr, blob)
    backing = b""
    if hdr.backing_file_offset:
        limit = min(_MAX_BACKING_NAME, cs - hdr.backing_file_offset)
        if hdr.backing_file_size > limit:
            raise bad("backing_file_size", f"Backing file name too long (at most {limit} bytes here)")
        # QEMU reads the name as a C string: an empty one (size 0, or a NUL first) means no backing file.
        backing = read_exact(file, hdr.backing_file_offset, hdr.backing_file_size).split(b"\0", 1)[0]
    if hdr.version >= 3 and hdr.autoclear_features & spec.RAW_EXTERNAL_BIT and not (
            hdr.incompatible_features & spec.EXTERNAL_DATA_FILE_BIT):
        raise bad("autoclear_features", "data-file-raw requires a data file")
    _refuse_unimplemented(path, hdr, exts, backing)
    return ParsedHeader(hdr, exts, names), (first_read if not more and not hdr.backing_file_offset else None)


def _check_compression_type(path: str, hdr: Header) -> None:
    """QEMU's validate_compression_type: 0 zlib or 1 zstd, and incompatible bit 3 set exactly when it is not zlib."""
    ctype = hdr.compression_type if hdr.version >= 3 and hdr.header_length > 104 else 0
    bit = hdr.incompatible_features & spec.COMPRESSION_TYPE_BIT
    if ctype not in (0, 1):
        raise InvalidImage(path, 104, "compression_type", ctype, f"qcow2: unknown compression type: {ctype}")
    if ctype == 0 and bit:
        raise InvalidImage(path, FIELD_OFFSET["incompatible_features"], "incompatible_features", hdr.incompatible_features,
                           "qcow2: Compression type incompatible feature bit must not be set")
    if ctype != 0 and not bit:
        raise InvalidImage(path, FIELD_OFFSET["incompatible_features"], "incompatible_features", hdr.incompatible_features,
                           "qcow2: Compression type incompatible feature bit must be set")


def _check_features(path: str, file: BlockFile, hdr: Header, *, writable: bool, check_mode: bool) -> None:
    incompat = hdr.incompatible_features
    unknown = incompat & ~_QEMU_INCOMPAT_MASK
    if unknown:
        names = _feature_names(file, hdr)
        listed = [names.get((0, bit), f"unknown incompatible feature bit {bit}") for bit in range(64) if unknown >> bit & 1]
        raise UnsupportedFeature(path, FIELD_OFFSET["incompatible_features"], "incompatible_features", listed)
    if incompat & spec.CORRUPT_BIT and writable and not check_mode:
        raise InvalidImage(path, FIELD_OFFSET["incompatible_features"], "incompatible_features", incompat,
                           "qcow2: Image is corrupt; cannot be opened read/write (repair it with `check -r all`)")
    if incompat & spec.EXTENDED_L2_BIT and hdr.cluster_bits - 5 < spec.MIN_CLUSTER_BITS:
        sub = 1 << (hdr.cluster_bits - 5)
        raise InvalidImage(path, FIELD_OFFSET["cluster_bits"], "cluster_bits", hdr.cluster_bits,
                           f"Unsupported subcluster size: {sub}")


def _feature_names(file: BlockFile, hdr: Header) -> dict[tuple[int, int], str]:
    """The feature-name table, read leniently (as QEMU does only to word its "Unsupported feature" error)."""
    try:
        return _read_extensions(file, hdr)[1]
    except InvalidImage:
        return {}


def _refuse_unimplemented(path: str, hdr: Header, exts: list[HeaderExtension], backing: bytes) -> None:
    """Images QEMU opens but qcrash does not implement: refused by name, after every QEMU rule has passed."""
    unsupported = hdr.incompatible_features & ~int(spec.INCOMPAT_SUPPORTED) & _QEMU_INCOMPAT_MASK
    if unsupported:
        names = [name for kind, bit, name in spec.FEATURE_NAMES if kind == 0 and unsupported >> bit & 1]
        raise UnsupportedFeature(path, FIELD_OFFSET["incompatible_features"], "incompatible_features", names)
    if hdr.crypt_method:
        raise UnsupportedFeature(path, FIELD_OFFSET["crypt_method"], "crypt_method", ["encryption"])
    if backing:
        raise UnsupportedFeature(path, FIELD_OFFSET["backing_file_offset"], "backing_file_offset", ["backing file"])


def _validate_table(path: str, field: str, name: str, offset: int, entries: int, entry_len: int, max_bytes: int, cs: int) -> None:
    """QEMU's qcow2_validate_table: "<name> too large" (EFBIG), "<name> offset invalid" (EINVAL)."""
    if entries > max_bytes // entry_len:
        raise InvalidImage(path, FIELD_OFFSET[field], field, offset, f"{name} too large ({entries} entries, at most {max_bytes // entry_len})")
    if (1 << 63) - 1 - entries * entry_len < offset or offset % cs:
        raise InvalidImage(path, FIELD_OFFSET[field], field, offset, f"{name} offset invalid (must be cluster-aligned and fit in 63 bits)")


def _read_extensions(file: BlockFile, hdr: Header, blob: bytes | None = None
                     ) -> tuple[list[HeaderExtension], dict[tuple[int, int], str], bytes, bool]:
    """QEMU's qcow2_read_extensions: from header_length up to the backing file name (or the end of cluster 0).

    `blob`: the first read of cluster 0, when the caller made it already. Also returns that
    first read, and whether the chain needed more of cluster 0 after it.
    """
    path = file.name
    cs = 1 << hdr.cluster_bits
    end = hdr.backing_file_offset or cs
    # The extensions end a few hundred bytes in: cluster 0 is read whole only up to _EXTENSIONS_READ
    # (with 2 MiB clusters every open copied 2 MiB here), and the rest only if the chain goes on.
    if blob is None:
        blob = read_exact(file, 0, min(end, _EXTENSIONS_READ))
    first_read = blob
    pos = hdr.header_length
    exts: list[HeaderExtension] = []
    names: dict[tuple[int, int], str] = {}
    while pos < end:
        if pos + 8 > end:
            raise InvalidImage(path, pos, "header extension", pos,
                               f"Header extension too large (its 8-byte type and length run past {end:#x})")
        if pos + 8 > len(blob):
            blob += read_exact(file, len(blob), end - len(blob))
        ext_type, length = struct.unpack_from(">II", blob, pos)
        data_end = pos + 8 + length
        if data_end > end:
            raise InvalidImage(path, pos, "header extension length", length,
                               f"Header extension too large (extension {ext_type:#x} runs past {end:#x})")
        if data_end > len(blob):
            blob += read_exact(file, len(blob), end - len(blob))
        if ext_type == spec.EXT_END:
            break
        data = bytes(blob[pos + 8 : data_end])
        _check_extension(path, hdr, pos, ext_type, data)
        if ext_type == spec.EXT_FEATURE_TABLE:
            names = parse_feature_table(data)
        else:
            exts.append(HeaderExtension(ext_type, data, pos))
        pos = data_end + (-length % 8)
    return exts, names, first_read, blob is not first_read


def _check_extension(path: str, hdr: Header, pos: int, ext_type: int, data: bytes) -> None:
    """The per-extension rules of qcow2_read_extensions that qcrash can meet."""
    if ext_type == spec.EXT_BACKING_FORMAT and len(data) >= _BACKING_FORMAT_MAX:
        raise InvalidImage(path, pos, "backing format extension length", len(data),
                           f"ERROR: ext_backing_format: len={len(data)} too large (>={_BACKING_FORMAT_MAX})")
    if ext_type == spec.EXT_BITMAPS:
        _check_bitmaps_extension(path, hdr, pos, data)
    if ext_type == spec.EXT_CRYPTO:
        if len(data) != _CRYPTO_EXT_SIZE:
            raise InvalidImage(path, pos, "crypto header extension length", len(data),
                               f"CRYPTO header extension size {len(data)}, but expected size {_CRYPTO_EXT_SIZE}")
        if hdr.crypt_method != 2:
            raise InvalidImage(path, pos, "crypto header extension", hdr.crypt_method,
                               "CRYPTO header extension only expected with LUKS encryption method")


_MAX_BITMAPS = 65535
_MAX_BITMAP_DIRECTORY_SIZE = 1024 * _MAX_BITMAPS


def _check_bitmaps_extension(path: str, hdr: Header, pos: int, data: bytes) -> None:
    """qcow2_read_extensions on the bitmaps extension: its length always, its fields only with autoclear bit 0."""
    if len(data) != 24:
        raise InvalidImage(path, pos, "bitmaps extension length", len(data), "bitmaps_ext: Invalid extension length")
    if not hdr.autoclear_features & spec.AutoclearFeature.BITMAPS:
        return  # QEMU warns that the bitmaps are inconsistent and goes on
    nb, reserved, dir_size, dir_offset = struct.unpack(">IIQQ", data)
    cs = 1 << hdr.cluster_bits
    if reserved:
        raise InvalidImage(path, pos + 12, "bitmaps extension reserved", reserved, "bitmaps_ext: Reserved field is not zero")
    if nb > _MAX_BITMAPS:
        raise InvalidImage(path, pos + 8, "nb_bitmaps", nb,
                           f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of {_MAX_BITMAPS}")
    if nb == 0:
        raise InvalidImage(path, pos + 8, "nb_bitmaps", nb, "found bitmaps extension with zero bitmaps")
    if dir_offset % cs:
        raise InvalidImage(path, pos + 24, "bitmap_directory_offset", dir_offset, "bitmaps_ext: invalid bitmap directory offset")
    if dir_size > _MAX_BITMAP_DIRECTORY_SIZE:
        raise InvalidImage(path, pos + 16, "bitmap_directory_size", dir_size,
                           f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum supported size "
                           f"({_MAX_BITMAP_DIRECTORY_SIZE})")


def cluster0_bytes(hdr: Header, extensions: list[HeaderExtension]) -> bytes:
    """The whole of cluster 0 as qcow2_update_header writes it: header, extensions, end marker, zeros."""
    cs = 1 << hdr.cluster_bits
    out = bytearray(hdr.pack())
    for ext in extensions:
        if ext.type != spec.EXT_FEATURE_TABLE:
            out += ext.pack()
    # QEMU writes the feature-name table only for v3 and when cluster_size > 4096.
    if hdr.version >= 3 and cs > 4096:
        out += feature_table_extension().pack()
    out += bytes(8)  # end marker
    if hdr.backing_file_offset:
        # Only an empty backing file name gets this far: qcow2_update_header writes it (0 bytes)
        # right after the end marker and points the header there, so the extensions never run into it.
        out[8:20] = len(out).to_bytes(8, "big") + bytes(4)
    if len(out) > cs:
        # qcow2_update_header fails with ENOSPC: the header (with its unknown fields) and
        # the extensions no longer fit in cluster 0 (e.g. header_length 0xfff8).
        raise InvalidImage("<header>", FIELD_OFFSET["header_length"], "header_length", hdr.header_length,
                           f"header and extensions ({len(out)} bytes) do not fit in cluster 0 ({cs:#x} bytes): "
                           "qcow2_update_header fails with ENOSPC")
    out += bytes(cs - len(out))
    return bytes(out)
