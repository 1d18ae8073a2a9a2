"""Check and repair on hostile images: a repair never reports success on an image that is still corrupt, bounded work on huge tables."""

from __future__ import annotations

import struct

from models.blockio import MemoryFile
from models.qcow2 import spec
from models.qcow2.check import Fix, Kind, check, repair
from models.qcow2.image import Qcow2Image
from models.qcow2.structs import FIELD_OFFSET

_BITS = int(spec.IncompatFeature.DIRTY | spec.IncompatFeature.CORRUPT)


def _image(cluster_size: int = 65536) -> bytearray:
    f = MemoryFile(name="h.qcow2")
    Qcow2Image.create(f, 1 << 20, cluster_size=cluster_size)
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
