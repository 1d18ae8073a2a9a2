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


@pytest.mark.parametrize("size", [0, 1, 512, 8191, 8192, 2 << 20])
def test_zero_from_says_whether_every_byte_from_start_is_zero(size: int) -> None:
    from models.qcow2.scan import zero_from

    rng = random.Random(size)
    starts = sorted({0, size // 2, max(0, size - 1), size, size + 5} | {rng.randrange(size + 1) for _ in range(4)})
    for where in sorted({0, size // 3, max(0, size - 1)}) if size else []:
        raw = bytearray(size)
        raw[where] = rng.randrange(1, 256)
        for start in starts:
            assert zero_from(bytes(raw), start) == (where < start), (size, where, start)
            assert zero_from(raw, start) == (where < start), (size, where, start)
    assert zero_from(bytes(size), 0)


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 4096, 262144])
@pytest.mark.parametrize("set_share", [0, 1 / 4096, 1 / 33, 1 / 31, 1 / 2])
def test_u64_array_is_the_struct_unpacked_table_sparse_or_dense(n: int, set_share: float) -> None:
    from models.qcow2.scan import u64_array

    rng = random.Random(n)
    entries = [0] * n
    for i in rng.sample(range(n), int(n * set_share)):
        entries[i] = rng.choice((1, 1 << 63, rng.randrange(1, 1 << 64)))
    raw = struct.pack(f">{n}Q", *entries) + b"\x07" * (n % 5)  # (a ragged tail is not an entry)
    out = u64_array(raw)
    assert out.typecode == "Q" and out.tolist() == entries
    assert u64_array(bytearray(raw)).tolist() == entries
