"""Malformed images: a Hypothesis property that mutates valid images (header fields, table offsets and sizes, L1/L2/reftable entries, extension lengths, truncation, random bytes in cluster 0) and demands a clean open or a named Qcow2Error, never another exception or a hang (the per-rule messages are pinned in test_header_rules.py)."""

from __future__ import annotations

import contextlib
import signal
import struct

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from harness.cli import img as cli_img
from models.blockio import MemoryFile
from models.qcow2 import spec
from models.qcow2.errors import InvalidImage, Qcow2Error, UnsupportedFeature
from models.qcow2.image import Qcow2Image
from models.qcow2.structs import HEADER_FIELDS
from tests.property._header_tools import FIELD_CODES, NAME, KiB, MiB

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
