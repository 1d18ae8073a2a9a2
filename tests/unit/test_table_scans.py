"""The C-speed table scans of the check (non-zero entries of a refcount table or an L1, a rebuilt table's bytes) against plain loops."""

from __future__ import annotations

import array
import random
import struct

import pytest

from models.qcow2.check.imrt import nonzero_values
from models.qcow2.check.rebuild import _be_u64


@pytest.mark.parametrize("n", [0, 1, 7, 300, 4096, 262144])
@pytest.mark.parametrize("kind", ["list", "array"])
def test_nonzero_values_are_the_nonzero_entries_in_order(n: int, kind: str) -> None:
    rng = random.Random(n)
    entries = [0] * n
    for _ in range(min(n, 40)):
        entries[rng.randrange(n)] = rng.choice((1, 1 << 63, rng.randrange(1 << 64)))
    if n:
        entries[-1] = 5  # (the last entry, past the whole blocks numpy searches first)
    table = entries if kind == "list" else array.array("Q", entries)
    assert nonzero_values(table) == [e for e in entries if e]


@pytest.mark.parametrize("n", [0, 1, 512, 262144])
def test_rebuilt_table_bytes_are_struct_packed_big_endian(n: int) -> None:
    rng = random.Random(n)
    entries = [rng.choice((0, 0, 0, rng.randrange(1 << 64))) for _ in range(n)]
    assert _be_u64(entries) == struct.pack(f">{n}Q", *entries)
    with pytest.raises(OverflowError):
        _be_u64([1 << 64])
