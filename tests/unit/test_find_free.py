"""The bounded free-cluster search: `first_zero` agrees with a plain scan, and refcount blocks full of maximal counts end in a result or a named error."""

from __future__ import annotations

import random
import struct

import pytest

from models.blockio import MemoryFile
from models.qcow2.errors import Qcow2Error
from models.qcow2.geometry import get_refcount
from models.qcow2.image import Qcow2Image
from models.qcow2.freesearch import first_zero


@pytest.mark.parametrize("order", range(7))
def test_first_zero_matches_a_plain_scan(order):
    rng = random.Random(order)
    entries = (64 * 8) >> order if order < 3 else 64
    for _ in range(300):
        nbytes = max(1, entries * (1 << order) // 8)
        block = bytearray(rng.choice([0, 1, 0xFF, 0x10]) if rng.random() < 0.9 else rng.randrange(256) for _ in range(nbytes))
        start = rng.randrange(entries)
        want = next((i for i in range(start, entries) if get_refcount(block, i, order) == 0), None)
        assert first_zero(block, start, order, entries) == want


def test_reftable_of_full_blocks_gives_a_result_or_a_named_error():
    mem = MemoryFile(name="full.qcow2")
    Qcow2Image.create(mem, 1 << 20, cluster_size=512)
    raw = bytearray(mem.getvalue())
    reftable = struct.unpack_from(">Q", raw, 48)[0]
    block = struct.unpack_from(">Q", raw, reftable)[0]
    raw[block : block + 512] = b"\xff" * 512  # every count maximal
    for i in range(64):  # every reftable entry points at that one block
        struct.pack_into(">Q", raw, reftable + 8 * i, block)
    img = Qcow2Image.open(MemoryFile(bytes(raw), name="full.qcow2", max_size=1 << 24))
    try:
        img.write(0, b"x" * 512)
    except Qcow2Error as exc:
        assert "full.qcow2" in str(exc)
    else:
        assert img.read(0, 512) == b"x" * 512
