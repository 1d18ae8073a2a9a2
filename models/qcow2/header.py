"""Reading, validating and rewriting cluster 0: the header, its extensions, and QEMU's open-time checks (§2.7)."""

from __future__ import annotations

import dataclasses
import struct

from models.blockio import BlockFile, read_exact
from models.qcow2 import spec
from models.qcow2.errors import InvalidImage, UnsupportedFeature
from models.qcow2.geometry import Geometry
from models.qcow2.structs import FIELD_OFFSET, Header, HeaderExtension, feature_table_extension, parse_feature_table

_FEATURE_KINDS = {0: "incompatible", 1: "compatible", 2: "autoclear"}


@dataclasses.dataclass
class ParsedHeader:
    header: Header
    extensions: list[HeaderExtension]
    feature_names: dict[tuple[int, int], str]

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.header.cluster_bits, self.header.refcount_order)


def read_header(file: BlockFile, *, writable: bool, check_mode: bool = False) -> ParsedHeader:
    """Read and validate cluster 0 in QEMU's order; raise a named error for the first rule broken."""
    path = file.name
    size = file.size()
    if size < spec.V2_HEADER_LENGTH:
        raise InvalidImage(path, 0, "file size", size, f"too short for a qcow2 header ({spec.V2_HEADER_LENGTH} bytes)")
    raw = read_exact(file, 0, spec.V3_HEADER_LENGTH)
    hdr = Header.unpack(raw)

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
        if hdr.header_length % 8:
            raise bad("header_length", "must be a multiple of 8")
        if hdr.header_length > cs:
            raise bad("header_length", f"qcow2 header exceeds cluster size ({cs:#x})")
    if hdr.backing_file_offset > cs:
        raise bad("backing_file_offset", f"Invalid backing file offset (must be <= cluster size {cs:#x})")
    exts, names = _read_extensions(file, hdr)
    _check_features(path, hdr, names, writable=writable, check_mode=check_mode)
    if hdr.version >= 3 and hdr.refcount_order > spec.MAX_REFCOUNT_ORDER:
        raise bad("refcount_order", "must be at most 6 (64-bit refcounts)")
    if hdr.refcount_table_clusters == 0 and not check_mode:
        raise bad("refcount_table_clusters", "Image does not contain a reference count table")
    _validate_table(path, "refcount_table_offset", "Reference count table", hdr.refcount_table_offset,
                    hdr.refcount_table_clusters * cs // 8, 8, spec.QCOW_MAX_REFTABLE_SIZE, cs)
    _validate_table(path, "l1_table_offset", "Active L1 table", hdr.l1_table_offset, hdr.l1_size, 8,
                    spec.QCOW_MAX_L1_SIZE, cs)
    geo = Geometry(hdr.cluster_bits, hdr.refcount_order)
    if hdr.l1_size < geo.size_to_l1(hdr.size):
        raise bad("l1_size", f"L1 table is too small (the virtual size {hdr.size:#x} needs {geo.size_to_l1(hdr.size)} entries)")
    if hdr.crypt_method:
        raise UnsupportedFeature(path, FIELD_OFFSET["crypt_method"], "crypt_method", ["encryption"])
    if hdr.backing_file_offset:
        raise UnsupportedFeature(path, FIELD_OFFSET["backing_file_offset"], "backing_file_offset", ["backing file"])
    if hdr.nb_snapshots > spec.QCOW_MAX_SNAPSHOTS:
        raise bad("nb_snapshots", f"Too many snapshots (at most {spec.QCOW_MAX_SNAPSHOTS})")
    if not check_mode:
        _validate_table(path, "snapshots_offset", "Snapshot table", hdr.snapshots_offset, hdr.nb_snapshots, 40,
                        40 * spec.QCOW_MAX_SNAPSHOTS, cs)
    return ParsedHeader(hdr, exts, names)


def _check_features(path: str, hdr: Header, names: dict[tuple[int, int], str], *, writable: bool, check_mode: bool) -> None:
    incompat = hdr.incompatible_features
    unknown = incompat & ~int(spec.INCOMPAT_SUPPORTED)
    if unknown:
        listed = [names.get((0, bit), f"unknown incompatible feature bit {bit}") for bit in range(64) if unknown >> bit & 1]
        raise UnsupportedFeature(path, FIELD_OFFSET["incompatible_features"], "incompatible_features", listed)
    if incompat & spec.IncompatFeature.CORRUPT and writable and not check_mode:
        raise InvalidImage(path, FIELD_OFFSET["incompatible_features"], "incompatible_features", incompat,
                           "Image is corrupt (bit 1 set); cannot be opened read/write (repair it with `check -r all`)")
    if hdr.version >= 3 and hdr.compression_type != 0:
        raise UnsupportedFeature(path, 104, "compression_type", [f"compression type {hdr.compression_type}"])


def _validate_table(path: str, field: str, name: str, offset: int, entries: int, entry_len: int, max_bytes: int, cs: int) -> None:
    if entries > max_bytes // entry_len:
        raise InvalidImage(path, FIELD_OFFSET[field], field, offset, f"{name} too large ({entries} entries, at most {max_bytes // entry_len})")
    if (1 << 63) - 1 - entries * entry_len < offset or offset % cs:
        raise InvalidImage(path, FIELD_OFFSET[field], field, offset, f"{name} offset invalid (must be cluster-aligned and fit in 63 bits)")


def _read_extensions(file: BlockFile, hdr: Header) -> tuple[list[HeaderExtension], dict[tuple[int, int], str]]:
    path = file.name
    cs = 1 << hdr.cluster_bits
    end = hdr.backing_file_offset or cs
    blob = read_exact(file, 0, end)
    pos = hdr.header_length
    exts: list[HeaderExtension] = []
    names: dict[tuple[int, int], str] = {}
    while pos + 8 <= end:
        ext_type, length = struct.unpack_from(">II", blob, pos)
        if ext_type == spec.EXT_END:
            break
        data_end = pos + 8 + length
        if data_end > end:
            raise InvalidImage(path, pos, "header extension length", length,
                               f"Header extension too large (extension {ext_type:#x} runs past {end:#x})")
        data = bytes(blob[pos + 8 : data_end])
        if ext_type == spec.EXT_FEATURE_TABLE:
            names = parse_feature_table(data)
        elif ext_type in (spec.EXT_DATA_FILE,):
            raise UnsupportedFeature(path, pos, "header extension", ["external data file"])
        elif ext_type in (spec.EXT_CRYPTO,):
            raise UnsupportedFeature(path, pos, "header extension", ["encryption"])
        else:
            exts.append(HeaderExtension(ext_type, data, pos))
        pos = data_end + (-length % 8)
    return exts, names


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
    out += bytes(cs - len(out))
    return bytes(out)
