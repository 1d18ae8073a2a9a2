"""Hostile input: QEMU 7.2's qcow2_do_open rules with its messages, host ranges past 2^63, bounded in-memory growth, a header that no longer fits cluster 0."""

from __future__ import annotations

import struct

import pytest

from models.blockio import MemoryFile, OsFile, read_exact
from models.qcow2.errors import HostIOError, HostRangeError, InvalidImage, Qcow2Error
from models.qcow2.header import cluster0_bytes, read_header
from models.qcow2.image import Qcow2Image

NAME = "h.qcow2"


def image(cs: int = 65536) -> bytearray:
    mem = MemoryFile(name=NAME)
    Qcow2Image.create(mem, 1 << 20, cluster_size=cs)
    return bytearray(mem.getvalue())


def refused(buf: bytes, text: str, *, readonly: bool = True) -> InvalidImage:
    with pytest.raises(InvalidImage) as info:
        Qcow2Image.open(MemoryFile(bytes(buf), name=NAME), readonly=readonly)
    assert text in str(info.value) and str(info.value).startswith(NAME)
    return info.value


def test_snapshot_table_offset_invalid():
    buf = image()
    struct.pack_into(">IQ", buf, 60, 1, 0x10008)
    err = refused(buf, "Snapshot table offset invalid")
    assert err.field == "snapshots_offset" and err.offset == 64


def test_snapshot_table_too_large():
    buf = image()
    struct.pack_into(">I", buf, 60, 65537)
    refused(buf, "Snapshot table too large")


def test_backing_file_name_too_long():
    buf = image(cs=4096)
    struct.pack_into(">QI", buf, 8, 0x800, 0x900)  # 0x900 bytes cannot fit between 0x800 and 0x1000
    refused(buf, "Backing file name too long")


def test_image_is_too_big():
    buf = image(cs=512)
    struct.pack_into(">Q", buf, 24, (1 << 64) - 512)
    refused(buf, "Image is too big")


def test_data_file_raw_requires_a_data_file():
    buf = image()
    struct.pack_into(">Q", buf, 88, 2)
    refused(buf, "data-file-raw requires a data file")


@pytest.mark.parametrize("length, body, text", [
    (16, bytes(16), "bitmaps_ext: Invalid extension length"),
    (24, struct.pack(">IIQQ", 0, 0, 0, 0), "found bitmaps extension with zero bitmaps"),
    (24, struct.pack(">IIQQ", 1, 0, 0, 0x200), "bitmaps_ext: invalid bitmap directory offset"),
])
def test_bitmaps_extension_rules(length, body, text):
    buf = image(cs=4096)
    struct.pack_into(">Q", buf, 88, 1)  # autoclear bit 0: the bitmaps are meant to be consistent
    struct.pack_into(f">II{len(body)}s", buf, 0x70, 0x23852875, length, body)
    refused(buf, text)


def test_extension_header_running_past_the_area():
    buf = image(cs=4096)
    struct.pack_into(">I", buf, 100, 4096 - 4)  # 4 bytes left: no room for an extension's type and length
    refused(buf, "Header extension too large")


def test_offsets_at_or_past_2_63_are_named_errors():
    mem = MemoryFile(b"x" * 16, name=NAME)
    for offset, length in ((1 << 63, 8), ((1 << 63) - 4, 8), (-1, 8), (0, -1), ((1 << 64) - 512, 512)):
        with pytest.raises(HostRangeError) as info:
            read_exact(mem, offset, length)
        assert isinstance(info.value, ValueError) and NAME in str(info.value)


def test_l1_entry_past_2_63_reads_as_a_named_error():
    buf = image()
    struct.pack_into(">Q", buf, 0x30000, 0x8000000000000000 | 0x00FFFFFFFFFF0000)
    img = Qcow2Image.open(MemoryFile(bytes(buf), name=NAME), readonly=True)
    try:
        img.read(0, 512)
    except Qcow2Error as exc:
        assert NAME in str(exc)


def test_memory_file_growth_is_bounded():
    mem = MemoryFile(name=NAME, max_size=1 << 20)
    with pytest.raises(HostIOError, match="No space left on device"):
        mem.pwrite(1 << 40, b"x")
    with pytest.raises(HostIOError):
        mem.truncate(1 << 21)
    assert mem.size() == 0


def test_os_file_errors_are_named(tmp_path):
    f = OsFile(tmp_path / "f", create=True)
    try:
        with pytest.raises(HostIOError, match="host write at offset"):
            f.pwrite((1 << 63) - 4096, b"x" * 8192)  # ends past 2^63: refused before the OS sees it
    except HostRangeError:
        pass
    finally:
        f.close()


def test_header_that_no_longer_fits_cluster_0_is_a_named_error():
    buf = image()
    struct.pack_into(">I", buf, 100, 0xFFF8)
    buf[0xFFF8:0x10000] = bytes(8)  # the end marker right after the header
    parsed = read_header(MemoryFile(bytes(buf), name=NAME), writable=True)
    with pytest.raises(InvalidImage, match="do not fit in cluster 0"):
        cluster0_bytes(parsed.header, parsed.extensions)
    img = Qcow2Image.open(MemoryFile(bytes(buf), name=NAME), lazy_refcounts=True)
    with pytest.raises(Qcow2Error):
        img.write(0, b"x" * 512)
        img.close()
