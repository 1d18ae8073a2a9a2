"""Fatal corruption events on a read-write open of a hostile image: QEMU's rules, and the fuzzer seeing them."""

from __future__ import annotations

import struct

import pytest

from harness.fuzz import imagecase
from models.blockio import MemoryFile
from models.qcow2.errors import CorruptImage
from models.qcow2.image import Qcow2Image

CS = 512


def fresh(cs: int = CS) -> bytearray:
    f = MemoryFile(name="t.qcow2")
    Qcow2Image.create(f, 1 << 20, cluster_size=cs)
    return bytearray(f.getvalue())


def refblock_past_eof(raw: bytearray) -> None:
    """Reftable entry 0 points far past EOF: every refcount reads 0, so cluster 0 looks free."""
    rt = struct.unpack_from(">Q", raw, 48)[0]
    struct.pack_into(">Q", raw, rt, 1 << 40)


def test_l2_table_allocated_at_offset_0_is_a_corruption_event_before_any_write() -> None:
    raw = fresh()
    refblock_past_eof(raw)
    f = MemoryFile(bytes(raw), name="t.qcow2")
    log: list[str] = []
    img = Qcow2Image.open(f, log=log.append)
    with pytest.raises(CorruptImage, match="Preventing invalid allocation of L2 table at offset 0"):
        img.write(0, b"\x11" * 512)
    assert log == ["qcow2: Marking image as corrupt: Preventing invalid allocation of L2 table at offset 0; "
                   "further corruption events will be suppressed"]
    after = f.getvalue()
    assert struct.unpack_from(">Q", after, 72)[0] & 2  # the corrupt bit, by the header rewrite
    assert len(after) == len(raw) and after[CS:] == bytes(raw[CS:])  # nothing else written: no refblock at 2^40


def test_open_rw_step_reports_a_corruption_event_it_logged() -> None:
    raw = fresh()
    refblock_past_eof(raw)
    step = imagecase.run_library(bytes(raw), steps=("open-rw",))[0]
    assert step.cls == "named" and step.corrupt
    clean = imagecase.run_library(bytes(fresh()), steps=("open-rw",))[0]
    assert clean.cls == "result" and not clean.corrupt


@pytest.mark.parametrize("size, name", [(0, b""), (8, bytes(8))])
def test_empty_backing_file_name_is_no_backing_file_as_qemu(size: int, name: bytes) -> None:
    raw = fresh(65536)
    struct.pack_into(">QI", raw, 8, 0x200, size)  # backing_file_offset, backing_file_size
    raw[0x200:0x200 + len(name)] = name
    f = MemoryFile(bytes(raw), name="t.qcow2")
    img = Qcow2Image.open(f)
    img.write(0, b"\x11" * 512)
    img.io.update_header()  # a full header rewrite (qcow2_update_header) moves the empty name after the end marker
    img.close()
    again = Qcow2Image.open(MemoryFile(f.getvalue()), readonly=True)
    assert again.read(0, 512) == b"\x11" * 512
    offset, length = struct.unpack_from(">QI", f.getvalue(), 8)
    assert length == 0 and offset > 104 and f.getvalue()[offset - 8:offset] == bytes(8)  # right after the end marker


def test_non_empty_backing_file_name_is_refused_by_name() -> None:
    from models.qcow2.errors import UnsupportedFeature

    raw = fresh(65536)
    struct.pack_into(">QI", raw, 8, 0x200, 4)
    raw[0x200:0x204] = b"base"
    with pytest.raises(UnsupportedFeature, match="backing file"):
        Qcow2Image.open(MemoryFile(bytes(raw), name="t.qcow2"), readonly=True)
