"""Malformed images: a Hypothesis property that mutates valid images (header fields, table offsets and sizes, L1/L2/reftable entries, extension lengths, truncation, random bytes in cluster 0) and demands a clean open or a named Qcow2Error, never another exception or a hang; plus one unit test per open-time validation rule (facts §2.7) with its exact message."""

from __future__ import annotations

import contextlib
import re
import signal
import struct

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from harness.cli import img as cli_img
from models.blockio import MemoryFile
from models.qcow2 import spec
from models.qcow2.errors import ImageNotWritable, InvalidImage, Qcow2Error, UnsupportedFeature
from models.qcow2.image import Qcow2Image
from models.qcow2.structs import HEADER_FIELDS

KiB, MiB = 1 << 10, 1 << 20
NAME = "mut.qcow2"
READ_CAP = 2 * MiB  # bytes of guest data read per example (sizes can be mutated up to 2^63)
HANG_SECONDS = 20


# --------------------------------------------------------------------------- base images
BASES = {
    # name: (create kwargs, virtual size, writes, abort at the end (dirty))
    "v3-64k": (dict(version=3, cluster_size=65536), 2 * MiB, [(0, 70000), (MiB + 5, 3000)], False),
    "v3-64k-lazy-dirty": (dict(version=3, cluster_size=65536, lazy_refcounts=True), 2 * MiB, [(0, 512)], True),
    "v2-4k": (dict(version=2, cluster_size=4096), MiB, [(4096, 9000)], False),
    "v3-512-r1": (dict(version=3, cluster_size=512, refcount_bits=1), MiB, [(0, 40000)], False),
    "v3-8k-r64": (dict(version=3, cluster_size=8192, refcount_bits=64), MiB, [(100, 20000)], False),
}
_base_cache: dict[str, bytes] = {}


def base_image(name: str) -> bytes:
    if name not in _base_cache:
        kw, size, writes, dirty = BASES[name]
        mem = MemoryFile(name=NAME)
        Qcow2Image.create(mem, size, **kw)
        img = Qcow2Image.open(mem, cache_mode="writethrough")
        for n, (off, length) in enumerate(writes):
            img.write(off, bytes([n + 0x41]) * length)
        img.abort() if dirty else img.close()
        _base_cache[name] = mem.getvalue()
    return _base_cache[name]


def header_of(buf: bytes) -> dict:
    return {name: struct.unpack_from(">" + code, buf, first)[0]
            for name, code, first, last in HEADER_FIELDS if last < len(buf)}


# --------------------------------------------------------------------------- mutations
FIELD_CODES = {name: (code, first) for name, code, first, _ in HEADER_FIELDS}
WIDTH = {"I": 32, "Q": 64, "B": 8}


def interesting(bits: int) -> st.SearchStrategy[int]:
    top = (1 << bits) - 1
    return st.one_of(
        st.sampled_from([0, 1, 2, 3, 4, 7, 8, 9, 16, 21, 22, 63, 64, 104, 112, 511, 512, 4096, 65536,
                         top, top >> 1, (top >> 1) + 1]),
        st.integers(0, top),
        st.integers(0, 1 << 24),
    ).map(lambda v: v & top)


class Case:
    """A mutated image; its repr names the base and the mutations, not the (large) bytes."""

    def __init__(self, base: str, done: list[str], buf: bytes) -> None:
        self.base, self.done, self.buf = base, done, buf

    def __repr__(self) -> str:
        return f"Case(base={self.base!r}, mutations={self.done!r})"


@st.composite
def mutations(draw) -> Case:
    base = draw(st.sampled_from(sorted(BASES)))
    buf = bytearray(base_image(base))
    h = header_of(buf)
    cs = 1 << h["cluster_bits"]
    done: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "field", "table", "l1", "l2", "reftable", "ext", "bytes"]))
        if kind == "field" or kind == "table":
            names = [n for n, _, _, last in HEADER_FIELDS if h["version"] >= 3 or last < 72]
            if kind == "table":
                names = ["l1_table_offset", "l1_size", "refcount_table_offset", "refcount_table_clusters",
                         "snapshots_offset", "nb_snapshots", "size"]
            name = draw(st.sampled_from(names))
            code, first = FIELD_CODES[name]
            old = struct.unpack_from(">" + code, buf, first)[0]
            value = draw(st.one_of(interesting(WIDTH[code]),
                                   st.integers(-3, 3).map(lambda d, o=old, c=code: (o + d) % (1 << WIDTH[c])),
                                   st.integers(0, 63).map(lambda b, o=old, c=code: (o ^ (1 << b)) % (1 << WIDTH[c]))))
            struct.pack_into(">" + code, buf, first, value)
            done.append(f"{name}: {old:#x} -> {value:#x}")
        elif kind in ("l1", "l2", "reftable"):
            if kind == "l1":
                table, count = h["l1_table_offset"], h["l1_size"]
            elif kind == "reftable":
                table, count = h["refcount_table_offset"], h["refcount_table_clusters"] * cs // 8
            else:
                l1_at = h["l1_table_offset"]
                l1e = struct.unpack_from(">Q", buf, l1_at)[0] if h["l1_size"] and l1_at + 8 <= len(buf) else 0
                table, count = l1e & spec.L1E_OFFSET_MASK, cs // 8
            if not table or not count or table + 8 > len(buf):
                continue
            i = draw(st.integers(0, min(count, (len(buf) - table) // 8) - 1))
            old = struct.unpack_from(">Q", buf, table + 8 * i)[0]
            value = draw(st.one_of(
                interesting(64),
                st.integers(0, len(buf) // cs + 4).map(lambda c, cs=cs: c * cs | (1 << 63)),
                st.integers(0, 63).map(lambda b, o=old: o ^ (1 << b)),
                st.just(old | spec.QCOW_OFLAG_COMPRESSED)))
            struct.pack_into(">Q", buf, table + 8 * i, value)
            done.append(f"{kind}[{i}] at {table + 8 * i:#x}: {old:#x} -> {value:#x}")
        elif kind == "ext":
            at = h["header_length"] if h["version"] >= 3 else 72
            if at + 8 > len(buf):
                continue
            if draw(st.booleans()):
                value = draw(interesting(32))
                struct.pack_into(">I", buf, at + 4, value)
                done.append(f"extension length at {at + 4:#x} -> {value:#x}")
            else:
                etype = draw(st.sampled_from([spec.EXT_FEATURE_TABLE, spec.EXT_BACKING_FORMAT, spec.EXT_BITMAPS,
                                              spec.EXT_CRYPTO, spec.EXT_DATA_FILE, 0x12345678]))
                length = draw(st.integers(0, cs))
                struct.pack_into(">II", buf, at, etype, length)
                done.append(f"extension at {at:#x}: type {etype:#x} length {length:#x}")
        else:
            limit = min(cs, len(buf))
            if not limit:
                continue
            off = draw(st.integers(0, limit - 1))
            data = draw(st.binary(min_size=1, max_size=16))
            buf[off : off + len(data)] = data
            done.append(f"bytes at {off:#x}: {data.hex()}")
    if draw(st.integers(0, 5)) == 0:  # truncation last, so the mutations above see the whole file
        new_len = draw(st.one_of(st.integers(0, len(buf)), st.sampled_from([0, 71, 72, 104, cs, 2 * cs, 3 * cs + 8])))
        del buf[new_len:]
        done.append(f"truncated to {new_len:#x}")
    return Case(base, done, bytes(buf))


@contextlib.contextmanager
def no_hang(seconds: int):
    def fire(_sig, _frame):
        raise TimeoutError(f"no result after {seconds} s: hang")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def assert_named(exc: Qcow2Error) -> None:
    msg = str(exc)
    assert NAME in msg, f"message does not name the file: {msg!r}"
    field = getattr(exc, "field", None)
    if isinstance(exc, (InvalidImage, UnsupportedFeature)):
        assert field and field in msg, f"message does not name the field {field!r}: {msg!r}"
    else:
        # Request-level errors name the operation or rule instead; they must still say something specific.
        assert len(msg) > len(NAME) + 10, msg


def exercise(buf: bytes, path) -> None:
    """Open read-only, read guest data (bounded), then `img info`; every error must be a named Qcow2Error."""
    mem = MemoryFile(buf, name=NAME)
    try:
        img = Qcow2Image.open(mem, readonly=True)
    except Qcow2Error as exc:
        assert_named(exc)
        event(f"open refused: {type(exc).__name__} {getattr(exc, 'field', '')}")
        return
    event("opened")
    size = img.size
    spans = [(0, min(size, READ_CAP))]
    if size > READ_CAP:
        spans.append((size - 64 * KiB, 64 * KiB))
    for off, length in spans:
        try:
            img.read(off, length)
        except Qcow2Error as exc:
            assert_named(exc)
            event(f"read refused: {type(exc).__name__}")
    assert mem.getvalue() == buf, "a read-only open wrote to the file"
    if not img.dirty and not img.hdr.incompatible_features & spec.IncompatFeature.CORRUPT:
        write_through(buf)
    path.write_bytes(buf)
    try:
        info = cli_img.image_info(str(path))
        cli_img.format_info_human(info)
    except Qcow2Error as exc:
        assert NAME in str(exc)
    except cli_img.CommandFailed as exc:
        assert NAME in str(exc)


class BoundedFile(MemoryFile):
    """A memory file that refuses to grow past WRITE_LIMIT (a mutated table offset may point at 2^55)."""

    def pwrite(self, offset, data, site=None):
        if offset + len(data) > WRITE_LIMIT:
            raise BeyondLimit(f"host write at {offset:#x}")
        super().pwrite(offset, data) if site is None else super().pwrite(offset, data, site)


class BeyondLimit(Exception):
    pass


WRITE_LIMIT = 64 * MiB


def write_through(buf: bytes) -> None:
    """Open read-write, write into the first and last cluster, close: any failure must be a named Qcow2Error.

    Metadata far past the end of the file is legal to QEMU (it writes there, making a sparse file);
    the in-memory file cannot hold that, so such examples stop at WRITE_LIMIT and count as skipped."""
    mem = BoundedFile(buf, name=NAME)
    try:
        img = Qcow2Image.open(mem, cache_mode="writethrough")
        img.write(0, b"\x77" * 512)
        if img.size > 4096:
            img.write(min(img.size, READ_CAP) - 4096, b"\x78" * 4096)
        img.close()
    except Qcow2Error as exc:
        assert_named(exc)
        event(f"write path refused: {type(exc).__name__}")
        return
    except BeyondLimit:
        event("write path: metadata beyond 64 MiB (skipped)")
        return
    event("written")


@pytest.fixture(scope="module")
def info_path(tmp_path_factory):
    return tmp_path_factory.mktemp("mutation") / NAME


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=mutations())
def test_mutated_images_open_or_fail_with_named_error(case, info_path):
    note(repr(case))
    with no_hang(HANG_SECONDS):
        exercise(case.buf, info_path)


def test_the_property_can_fail_on_an_unnamed_error():
    """The oracle's own check: an error message without the file name is caught."""
    with pytest.raises(AssertionError, match="does not name the file"):
        assert_named(InvalidImage("other.qcow2", 0, "magic", 0, "rule"))
    with pytest.raises(AssertionError, match="does not name the field"):
        exc = InvalidImage(NAME, 0, "magic", 0, "rule")
        exc.field = "version"
        assert_named(exc)


# --------------------------------------------------------------------------- one test per rule
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
