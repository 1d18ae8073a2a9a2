"""One unit test per open-time validation rule of a qcow2 image (facts §2.7), each with its exact message naming file, offset, field, value and rule."""

from __future__ import annotations

import re
import struct

import pytest

from models.blockio import MemoryFile
from models.qcow2 import spec
from models.qcow2.errors import ImageNotWritable, InvalidImage, Qcow2Error, UnsupportedFeature
from models.qcow2.image import Qcow2Image
from tests.property._header_tools import FIELD_CODES, NAME, MiB


def image(version: int = 3, cs: int = 65536, size: int = MiB, **kw) -> bytearray:
    mem = MemoryFile(name=NAME)
    Qcow2Image.create(mem, size, version=version, cluster_size=cs, **kw)
    return bytearray(mem.getvalue())


def put(buf: bytearray, field: str, value: int) -> bytearray:
    code, first = FIELD_CODES[field]
    struct.pack_into(">" + code, buf, first, value)
    return buf


def open_fails(buf: bytes, match: str, *, readonly: bool = True, exc_type=Qcow2Error):
    with pytest.raises(exc_type, match=match) as info:
        Qcow2Image.open(MemoryFile(bytes(buf), name=NAME), readonly=readonly)
    return info.value


def exact(text: str) -> str:
    return "^" + re.escape(text) + "$"


def test_rule_file_too_short():
    open_fails(b"QFI\xfb" + bytes(20), exact(f"{NAME} at offset 0x0: file size = 0x18: too short for a qcow2 header (72 bytes)"),
               exc_type=InvalidImage)


def test_rule_magic():
    open_fails(put(image(), "magic", 0x514649FA),
               exact(f"{NAME} at offset 0x0: magic = 0x514649fa: Image is not in qcow2 format (magic must be 0x514649fb)"),
               exc_type=InvalidImage)


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_rule_version(version):
    open_fails(put(image(), "version", version),
               exact(f"{NAME} at offset 0x4: version = {version:#x}: Unsupported qcow2 version (must be 2 or 3)"))


@pytest.mark.parametrize("bits", [0, 8, 22, 63])
def test_rule_cluster_bits(bits):
    open_fails(put(image(), "cluster_bits", bits),
               exact(f"{NAME} at offset 0x14: cluster_bits = {bits:#x}: Unsupported cluster size: 2^{bits} "
                     "(cluster_bits must be 9..21)"))


@pytest.mark.parametrize("length, rule", [
    (72, "qcow2 header too short (v3 needs at least 104 bytes)"),
    (103, "qcow2 header too short (v3 needs at least 104 bytes)"),
    (0x10008, "qcow2 header exceeds cluster size (0x10000)"),
])
def test_rule_header_length(length, rule):
    open_fails(put(image(), "header_length", length),
               exact(f"{NAME} at offset 0x64: header_length = {length:#x}: {rule}"))


def test_rule_backing_file_offset_beyond_cluster():
    open_fails(put(image(cs=4096), "backing_file_offset", 4097),
               exact(f"{NAME} at offset 0x8: backing_file_offset = 0x1001: Invalid backing file offset "
                     "(must be <= cluster size 0x1000)"))


def test_rule_header_length_need_not_be_a_multiple_of_8():
    # QEMU 7.2 opens it (the spec asks for a multiple of 8, qcow2_do_open does not check).
    buf = put(image(cs=4096), "header_length", 108)  # 108..115 now read as the end marker (zeros)
    assert Qcow2Image.open(MemoryFile(bytes(buf), name=NAME), readonly=True).read(0, 512) == bytes(512)


@pytest.mark.parametrize("bit, name", [(2, "external data file"), (4, "extended L2 entries")])
def test_rule_known_unsupported_incompatible_features_listed_by_name(bit, name):
    open_fails(put(image(), "incompatible_features", 1 << bit),
               exact(f"{NAME} at offset 0x48: incompatible_features: unsupported qcow2 feature(s): {name}"),
               exc_type=UnsupportedFeature)


def test_rule_unknown_incompatible_features_named_from_the_feature_table():
    buf = put(image(), "incompatible_features", (1 << 4) | (1 << 9) | (1 << 40))
    # As QEMU: only bits outside its mask are reported (not 4); turn the table's entry for
    # bit 4 into one for bit 9 and add nothing for 40: names come from the table when present.
    table = 0x70 + 8
    entries = [struct.unpack_from(">BB46s", buf, table + 48 * i) for i in range(8)]
    i4 = entries.index((0, 4, b"extended L2 entries".ljust(46, b"\0")))
    struct.pack_into(">BB46s", buf, table + 48 * i4, 0, 9, b"shiny new thing")
    open_fails(buf, exact(f"{NAME} at offset 0x48: incompatible_features: unsupported qcow2 feature(s): shiny new thing, "
                          "unknown incompatible feature bit 40"))


def test_rule_unknown_incompatible_features_without_a_table_small_clusters():
    open_fails(put(image(cs=4096), "incompatible_features", 1 << 5),
               exact(f"{NAME} at offset 0x48: incompatible_features: unsupported qcow2 feature(s): "
                     "unknown incompatible feature bit 5"))


def test_rule_corrupt_bit_refuses_read_write_open_only():
    buf = put(image(), "incompatible_features", 2)
    open_fails(buf, exact(f"{NAME} at offset 0x48: incompatible_features = 0x2: qcow2: Image is corrupt; cannot be "
                          "opened read/write (repair it with `check -r all`)"), readonly=False, exc_type=InvalidImage)
    img = Qcow2Image.open(MemoryFile(bytes(buf), name=NAME), readonly=True)
    assert img.read(0, 512) == bytes(512)


@pytest.mark.parametrize("ctype, bit, rule", [
    (1, 0, "incompatible_features = 0x0: qcow2: Compression type incompatible feature bit must be set"),
    (0, 8, "incompatible_features = 0x8: qcow2: Compression type incompatible feature bit must not be set"),
    (2, 8, None),
])
def test_rule_compression_type(ctype, bit, rule):
    buf = put(image(), "incompatible_features", bit)
    buf[104] = ctype
    where = "0x48" if rule else "0x68"
    rule = rule or "compression_type = 0x2: qcow2: unknown compression type: 2"
    open_fails(buf, exact(f"{NAME} at offset {where}: {rule}"), exc_type=InvalidImage)


def test_rule_zstd_is_refused_by_name_after_qemus_rules():
    buf = put(image(), "incompatible_features", 8)
    buf[104] = 1
    open_fails(buf, exact(f"{NAME} at offset 0x48: incompatible_features: unsupported qcow2 feature(s): compression type"),
               exc_type=UnsupportedFeature)


@pytest.mark.parametrize("order", [7, 32, 0xFFFFFFFF])
def test_rule_refcount_order(order):
    open_fails(put(image(), "refcount_order", order),
               exact(f"{NAME} at offset 0x60: refcount_order = {order:#x}: must be at most 6 (64-bit refcounts)"))


def test_rule_no_refcount_table():
    open_fails(put(image(), "refcount_table_clusters", 0),
               exact(f"{NAME} at offset 0x38: refcount_table_clusters = 0x0: Image does not contain a reference count table"))


def test_rule_refcount_table_too_large():
    open_fails(put(image(), "refcount_table_clusters", 129),
               exact(f"{NAME} at offset 0x30: refcount_table_offset = 0x10000: Reference count table too large "
                     "(1056768 entries, at most 1048576)"))


@pytest.mark.parametrize("offset", [0x10008, 0x7FFFFFFFFFFF0000])
def test_rule_refcount_table_offset_invalid(offset):
    open_fails(put(image(), "refcount_table_offset", offset),
               exact(f"{NAME} at offset 0x30: refcount_table_offset = {offset:#x}: Reference count table offset invalid "
                     "(must be cluster-aligned and fit in 63 bits)"))


def test_rule_l1_too_large():
    open_fails(put(image(), "l1_size", 4 * MiB + 1),
               exact(f"{NAME} at offset 0x28: l1_table_offset = 0x30000: Active L1 table too large "
                     "(4194305 entries, at most 4194304)"))


@pytest.mark.parametrize("offset, entries", [(0x30200, 1), (0x7FFFFFFFFFFF0000, 0x2001)])
def test_rule_l1_offset_invalid(offset, entries):
    # The second case is aligned but its end (offset + 8 * entries) overflows int64.
    open_fails(put(put(image(), "l1_table_offset", offset), "l1_size", entries),
               exact(f"{NAME} at offset 0x28: l1_table_offset = {offset:#x}: Active L1 table offset invalid "
                     "(must be cluster-aligned and fit in 63 bits)"))


def test_rule_l1_too_small():
    # 1 MiB with 64 KiB clusters needs 1 L1 entry; a size of 1 TiB needs 128.
    open_fails(put(image(), "size", 1 << 40),
               exact(f"{NAME} at offset 0x24: l1_size = 0x1: L1 table is too small (the virtual size 0x10000000000 "
                     "needs 2048 entries)"))


def test_rule_extension_outside_cluster_0():
    buf = image(cs=4096)
    struct.pack_into(">II", buf, 0x70, 0x12345678, 4096)
    open_fails(buf, exact(f"{NAME} at offset 0x70: header extension length = 0x1000: Header extension too large "
                          "(extension 0x12345678 runs past 0x1000)"))


def test_rule_feature_table_length_grown_past_cluster_0():
    buf = image()
    struct.pack_into(">I", buf, 0x74, 0x10000)
    open_fails(buf, r"header extension length = 0x10000: Header extension too large \(extension 0x6803f857 runs past 0x10000\)")


@pytest.mark.parametrize("field, value, feature", [
    ("crypt_method", 1, "encryption"),
    ("crypt_method", 2, "encryption"),
])
def test_rule_unsupported_header_features_refused_by_name(field, value, feature):
    code, first = FIELD_CODES[field]
    open_fails(put(image(), field, value),
               exact(f"{NAME} at offset {first:#x}: {field}: unsupported qcow2 feature(s): {feature}"),
               exc_type=UnsupportedFeature)


@pytest.mark.parametrize("nb, offset, rule", [
    (65537, 0x10000, "Snapshot table too large"),  # QEMU 7.2: qcow2_validate_table
    (1, 0x10001, "Snapshot table offset invalid"),
])
def test_rule_snapshot_table_validated(nb, offset, rule):
    """Internal snapshots are implemented (issue 16): the table's count and offset are validated as QEMU does."""
    buf = put(put(image(), "nb_snapshots", nb), "snapshots_offset", offset)
    with pytest.raises(InvalidImage, match=rule):
        Qcow2Image.open(MemoryFile(bytes(buf), name=NAME), readonly=True)


def test_rule_backing_file_refused_by_name():
    buf = image()
    buf[0x300:0x308] = b"base.img"
    put(buf, "backing_file_offset", 0x300)
    put(buf, "backing_file_size", 8)
    open_fails(buf, exact(f"{NAME} at offset 0x8: backing_file_offset: unsupported qcow2 feature(s): backing file"),
               exc_type=UnsupportedFeature)


def test_rule_crypto_extension_size_as_qemu():
    buf = image(cs=4096)
    struct.pack_into(">II8s", buf, 0x70, spec.EXT_CRYPTO, 8, b"data.raw")
    open_fails(buf, exact(f"{NAME} at offset 0x70: crypto header extension length = 0x8: "
                          "CRYPTO header extension size 8, but expected size 16"), exc_type=InvalidImage)


def test_rule_data_file_extension_without_its_feature_bit_is_ignored_as_qemu():
    buf = image(cs=4096)
    struct.pack_into(">II8s", buf, 0x70, spec.EXT_DATA_FILE, 8, b"data.raw")
    assert Qcow2Image.open(MemoryFile(bytes(buf), name=NAME), readonly=True).read(0, 512) == bytes(512)


def test_rule_unknown_extension_is_kept():
    buf = image(cs=4096)
    struct.pack_into(">II5s", buf, 0x70, 0x12345678, 5, b"hello")
    mem = MemoryFile(bytes(buf), name=NAME)
    img = Qcow2Image.open(mem)
    img.write(0, b"x" * 512)
    img.close()
    assert mem.getvalue()[0x70:0x80] == struct.pack(">II5s3x", 0x12345678, 5, b"hello")


def test_rule_compressed_cluster_refused_by_name_on_read():
    mem = MemoryFile(name=NAME)
    Qcow2Image.create(mem, MiB)
    img = Qcow2Image.open(mem)
    img.write(0, b"x" * 512)
    img.close()
    buf = bytearray(mem.getvalue())
    l2 = struct.unpack_from(">Q", buf, 0x30000)[0] & spec.L1E_OFFSET_MASK
    entry = struct.unpack_from(">Q", buf, l2)[0]
    struct.pack_into(">Q", buf, l2, (entry & ~spec.QCOW_OFLAG_COPIED) | spec.QCOW_OFLAG_COMPRESSED)
    img = Qcow2Image.open(MemoryFile(bytes(buf), name=NAME), readonly=True)
    with pytest.raises(UnsupportedFeature, match=exact(f"{NAME} at offset {l2:#x}: L2 entry 0: unsupported qcow2 feature(s): "
                                                       "compressed clusters")):
        img.read(0, 512)


def test_rule_unaligned_l2_table_offset_is_corruption():
    buf = image()
    struct.pack_into(">Q", buf, 0x30000, 0x8000000000040200)
    img = Qcow2Image.open(MemoryFile(bytes(buf), name=NAME), readonly=True)
    with pytest.raises(InvalidImage, match=exact(f"{NAME} at offset 0x30000: L1[0] = 0x8000000000040200: L2 table offset "
                                                 "0x40200 not aligned to cluster size 0x10000")):
        img.read(0, 1)


def test_rule_read_only_image_refuses_write_by_name():
    img = Qcow2Image.open(MemoryFile(bytes(image()), name=NAME), readonly=True)
    with pytest.raises(ImageNotWritable, match=exact(f"{NAME}: write: image opened read-only")):
        img.write(0, b"x")


class _ReadNoting(MemoryFile):
    def __init__(self, data: bytes) -> None:
        super().__init__(data, name=NAME)
        self.reads: list[tuple[int, int]] = []

    def pread(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return super().pread(offset, length)


def test_cluster_0_is_read_as_far_as_the_extensions_need():
    # With 2 MiB clusters every open copied all of cluster 0 to find extensions that end a few
    # hundred bytes in: it is read whole only up to 64 KiB (all of it for clusters up to 64 KiB).
    mem = _ReadNoting(bytes(image(cs=2 << 20)))
    Qcow2Image.open(mem, readonly=True)
    assert max(o + n for o, n in mem.reads if o < 2 << 20) <= 65536
    mem = _ReadNoting(bytes(image(cs=65536)))
    Qcow2Image.open(mem, readonly=True)
    assert (0, 65536) in mem.reads


@pytest.mark.parametrize("second_at, first_length", [(65528, None), (65536, None), (65544, None), (None, 100_001)])
def test_an_extension_chain_past_the_first_read_is_read_on(second_at, first_length):
    # Extensions that straddle or lie past the first 64 KiB of a large cluster 0 are read as before:
    # the chain, its order and its bytes do not depend on where the first read ended (the second
    # extension's header just before, exactly at and just past the end of the first read).
    buf = image(cs=2 << 20)
    end = 0x70
    while struct.unpack_from(">I", buf, end)[0] != spec.EXT_END:  # (past the feature table)
        end += 8 + (struct.unpack_from(">I", buf, end + 4)[0] + 7) // 8 * 8
    if first_length is None:
        first_length = second_at - end - 8
    body = bytes(range(256)) * (first_length // 256 + 1)
    second = end + 8 + (first_length + 7) // 8 * 8
    assert second_at is None or second == second_at
    struct.pack_into(f">II{first_length}s", buf, end, 0x12345678, first_length, body[:first_length])
    struct.pack_into(">II5sxxxII", buf, second, 0x0BADF00D, 5, b"hello", spec.EXT_END, 0)
    img = Qcow2Image.open(MemoryFile(bytes(buf), name=NAME), readonly=True)
    kept = [(e.type, e.data) for e in img.extensions if e.type in (0x12345678, 0x0BADF00D)]
    assert kept == [(0x12345678, body[:first_length]), (0x0BADF00D, b"hello")]


def test_an_extension_running_past_a_large_cluster_0_is_refused_as_before():
    buf = image(cs=1 << 17)
    struct.pack_into(">II", buf, 0x70, 0x12345678, 1 << 17)
    open_fails(buf, exact(f"{NAME} at offset 0x70: header extension length = 0x20000: Header extension too large "
                          "(extension 0x12345678 runs past 0x20000)"))


def _headers_and_reads(raw: bytes, memo: bool, monkeypatch, *, writable: bool = False, check_mode: bool = False):
    """read_header of `raw` with its memo on or off: (outcome, reads made); the outcome is the parsed header's
    fields, extensions and feature names, or the refusal's text."""
    import models.qcow2.header as headermod

    monkeypatch.setattr(headermod, "_MEMO", memo)
    mem = _ReadNoting(raw)
    try:
        p = headermod.read_header(mem, writable=writable, check_mode=check_mode)
        out = (p.header, [(e.type, e.data, e.offset) for e in p.extensions], p.feature_names)
    except Qcow2Error as exc:
        out = str(exc)
    return out, mem.reads


def _variants() -> list[bytes]:
    """Cluster 0s that share a header and differ in their extensions, and some that differ in the header."""
    out = []
    for cs in (512, 4096, 65536, 2 << 20):
        out.append(bytes(image(cs=cs)))
    out.append(bytes(image(version=2, cs=512)))
    out.append(bytes(image(cs=512, lazy_refcounts=True)))
    base = image(cs=65536)
    end = 0x70
    while struct.unpack_from(">I", base, end)[0] != spec.EXT_END:
        end += 8 + (struct.unpack_from(">I", base, end + 4)[0] + 7) // 8 * 8
    for payload in (b"one", b"two", b"two"):  # the same header, another extension, then the same again
        buf = bytearray(base)
        struct.pack_into(">II3sxxxxxII", buf, end, 0x0BADF00D, 3, payload, spec.EXT_END, 0)
        out.append(bytes(buf))
    bad = bytearray(base)
    struct.pack_into(">II", bad, end, 0x0BADF00D, 1 << 20)  # runs past cluster 0: refused
    out.append(bytes(bad))
    out.append(bytes(base))
    return out


@pytest.mark.parametrize("writable, check_mode", [(False, False), (True, False), (True, True)])
def test_the_header_memo_reads_and_answers_as_the_parse(writable, check_mode, monkeypatch):
    # read_header remembers headers that passed: opening a cluster 0 with the memo (cold and warm,
    # in an order where the same header comes back with other extensions) gives what the parse
    # gives, after the same reads in the same order.
    for raw in _variants() + _variants():
        want = _headers_and_reads(raw, False, monkeypatch, writable=writable, check_mode=check_mode)
        assert _headers_and_reads(raw, True, monkeypatch, writable=writable, check_mode=check_mode) == want


def test_a_remembered_header_is_handed_out_as_a_fresh_copy(monkeypatch):
    # Callers change the Header they are given (the dirty bit, the refcount table's place): a later
    # open of the same bytes must not see it, nor a change to the extension list or feature names.
    from models.qcow2.header import _stats, read_header

    raw = _variants()[6]  # 64 KiB clusters: a feature-name table and one unknown extension
    want = _headers_and_reads(raw, False, monkeypatch, writable=True)[0]
    monkeypatch.undo()
    for _ in range(2):  # the parse's result, then the memo's
        given = read_header(MemoryFile(raw, name=NAME), writable=True)
        assert given.extensions and given.feature_names
        given.header.incompatible_features |= spec.IncompatFeature.DIRTY
        given.extensions.clear()
        given.feature_names.clear()
    hits = _stats["hits"]
    again = _headers_and_reads(raw, True, monkeypatch, writable=True)[0]
    assert _stats["hits"] == hits + 1
    assert again == want and again[0].incompatible_features == 0


@pytest.mark.parametrize("failing", range(3))
def test_a_failing_read_fails_the_memo_where_it_fails_the_parse(failing, monkeypatch):
    # Each read of the open failed in turn: with the memo warm the same read fails, with the same error.
    from harness.faultfile import ErrorPlan, ErrorPoint, FaultInjectingFile

    raw = bytes(image(cs=65536))

    def outcome(memo: bool):
        import models.qcow2.header as headermod

        monkeypatch.setattr(headermod, "_MEMO", memo)
        headermod.read_header(MemoryFile(raw, name=NAME), writable=False)  # (warms the memo when on)
        f = FaultInjectingFile(MemoryFile(raw, name=NAME), ErrorPlan((ErrorPoint("read", failing),)))
        try:
            return headermod.read_header(f, writable=False).header
        except Exception as exc:  # noqa: BLE001 (the failure is what is compared)
            return f"{type(exc).__name__}: {exc}"

    assert outcome(True) == outcome(False)
