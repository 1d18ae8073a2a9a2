"""Check and repair on hostile images: a repair never reports success on an image that is still corrupt, bounded work on huge tables."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from models.blockio import MemoryFile
from models.qcow2 import spec
from models.qcow2.check import Fix, Kind, check, repair
from models.qcow2.errors import InvalidImage
from models.qcow2.image import Qcow2Image
from models.qcow2.structs import FIELD_OFFSET

_BITS = int(spec.IncompatFeature.DIRTY | spec.IncompatFeature.CORRUPT)


def _image(cluster_size: int = 65536, *, data: bool = True) -> bytearray:
    f = MemoryFile(name="h.qcow2")
    Qcow2Image.create(f, 1 << 20, cluster_size=cluster_size)
    if data:
        img = Qcow2Image.open(f)
        img.write(0, b"\x5a" * cluster_size)
        img.close()
    return bytearray(f.getvalue())


def _incompat(raw: bytes) -> int:
    return struct.unpack_from(">Q", raw, FIELD_OFFSET["incompatible_features"])[0]


def test_repair_that_leaves_the_rebuilt_structure_broken_keeps_the_dirty_and_corrupt_bits() -> None:
    raw = _image()
    struct.pack_into(">Q", raw, FIELD_OFFSET["incompatible_features"], _BITS)
    f = MemoryFile(bytes(raw[:0x68]), name="h.qcow2")  # header only: every table lies past EOF
    result = repair(f, Fix.ALL)
    assert any(x.kind is Kind.REBUILD_BROKEN for x in result.findings)
    assert not result.consistent_after_fix
    again = check(MemoryFile(f.getvalue(), name="h.qcow2"))
    assert again.corruptions or again.check_errors
    assert _incompat(f.getvalue()) & _BITS == _BITS


class _ReadRecorder(MemoryFile):
    """A MemoryFile that remembers the longest single read asked of it."""

    longest = 0

    def pread(self, offset: int, length: int) -> bytes:
        self.longest = max(self.longest, length)
        return super().pread(offset, length)


def test_an_l1_table_of_4m_entries_past_the_end_of_a_tiny_file_is_never_read_or_walked_in_full() -> None:
    raw = _image(cluster_size=512, data=False)
    struct.pack_into(">I", raw, FIELD_OFFSET["l1_size"], 0x400000)  # 32 MiB of L1 at 0x600, in a file of a few KiB
    for fix in (Fix.NONE, Fix.ALL):
        f = _ReadRecorder(bytes(raw), name="h.qcow2")
        result = repair(f, fix) if fix else check(f)
        past_eof = [x for x in result.findings if x.kind is Kind.PAST_EOF]
        assert [x.message for x in past_eof][:1] == [
            "ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
            "offset 0x600 size 0x2000000"]
        assert result.corruptions == 1 and result.check_errors == 0
        assert f.longest <= len(raw)  # the 32 MiB past the end were never asked for


def _with_extension(raw: bytearray, ext_type: int, data: bytes) -> None:
    """Replace the header extensions with one extension and the end marker."""
    pos = spec.V3_HEADER_LENGTH
    padded = data + bytes(-len(data) % 8)
    raw[pos : pos + 16 + len(padded)] = struct.pack(">II", ext_type, len(data)) + padded + bytes(8)


def _mutate(name: str, raw: bytearray) -> None:
    inc = FIELD_OFFSET["incompatible_features"]
    if name == "unknown compression type":
        raw[104] = 2
        struct.pack_into(">Q", raw, inc, int(spec.IncompatFeature.COMPRESSION_TYPE))
    elif name == "compression bit not set":
        raw[104] = 1
    elif name == "crypto extension without luks":
        _with_extension(raw, spec.EXT_CRYPTO, bytes(16))
    elif name == "bitmaps extension length":
        _with_extension(raw, spec.EXT_BITMAPS, bytes(8))
    elif name == "data-file-raw":
        struct.pack_into(">Q", raw, FIELD_OFFSET["autoclear_features"], int(spec.AutoclearFeature.RAW_EXTERNAL))
    elif name == "corrupt bit":
        struct.pack_into(">Q", raw, inc, int(spec.IncompatFeature.CORRUPT))


REFUSED = ("unknown compression type", "compression bit not set", "crypto extension without luks",
           "bitmaps extension length", "data-file-raw")


@pytest.mark.parametrize("name", REFUSED)
@pytest.mark.parametrize("fix", (Fix.NONE, Fix.ALL))
def test_check_and_repair_refuse_the_headers_qemu_refuses_with_a_named_error(name: str, fix: Fix) -> None:
    raw = _image()
    _mutate(name, raw)
    f = MemoryFile(bytes(raw), name="h.qcow2")
    with pytest.raises(InvalidImage):
        repair(f, fix) if fix else check(f)
    assert f.getvalue() == bytes(raw)


def test_repair_opens_a_corrupt_image_as_qemu_check_mode_does_and_clears_the_bit() -> None:
    raw = _image()
    _mutate("corrupt bit", raw)
    f = MemoryFile(bytes(raw), name="h.qcow2")
    result = repair(f, Fix.ALL)
    assert result.consistent_after_fix
    assert _incompat(f.getvalue()) & _BITS == 0


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed (Debian package qemu-utils)")
@pytest.mark.parametrize("name", REFUSED)
def test_qemu_img_check_refuses_the_same_headers(name: str, tmp_path: Path) -> None:
    raw = _image()
    _mutate(name, raw)
    path = tmp_path / "h.qcow2"
    path.write_bytes(bytes(raw))
    proc = subprocess.run(["qemu-img", "check", "-r", "all", str(path)], capture_output=True, text=True)
    assert proc.returncode == 1 and "Could not open" in proc.stderr, proc.stderr


@pytest.mark.parametrize("entry", (1 << 63, 0xFFFFFFFFFFFF0000, (1 << 63) - (1 << 16)))
def test_a_refcount_block_at_or_past_2_63_is_counted_as_qemu_does_not_a_host_range_error(entry: int) -> None:
    raw = _image()
    reftable = struct.unpack_from(">Q", raw, FIELD_OFFSET["refcount_table_offset"])[0]
    struct.pack_into(">Q", raw, reftable, entry)
    result = check(MemoryFile(bytes(raw), name="h.qcow2"))
    lines = [x.message for x in result.findings]
    # qemu-img 7.2 check: the block is outside the image, and every refcount lookup in it fails with EIO.
    assert lines[0] == "ERROR refcount block 0 is outside image"
    assert lines[1:] == [f"Can't get refcount for cluster {c}: Input/output error" for c in range(len(lines) - 1)]
    assert (result.corruptions, result.check_errors) == (1, len(lines) - 1)
    f = MemoryFile(bytes(raw), name="h.qcow2")
    fixed = repair(f, Fix.ALL)
    # The failed lookups stay check errors of the first pass, so (as QEMU) the bits are not cleared.
    assert fixed.rebuilt and not fixed.consistent_after_fix
    again = check(MemoryFile(f.getvalue(), name="h.qcow2"))
    assert (again.corruptions, again.check_errors) == (0, 0)
