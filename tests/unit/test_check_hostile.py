"""Check and repair on hostile images: a repair never reports success on an image that is still corrupt, bounded work on huge tables."""

from __future__ import annotations

import struct

from models.blockio import MemoryFile
from models.qcow2 import spec
from models.qcow2.check import Fix, Kind, check, repair
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
