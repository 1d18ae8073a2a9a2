"""`Extents.digest` and `hash_range` hash what `join` returns, whatever mix of small, large and zero extents lies there."""

from __future__ import annotations

import random

import pytest
import xxhash

from harness.crashstates.images import _SMALL_EXTENT, Extents


def _image(seed: int) -> Extents:
    """A base with 24 small extents laid over it, two large ones, a zero extent and a zero tail."""
    rng = random.Random(seed)
    base = rng.randbytes(6 * _SMALL_EXTENT)
    ext = Extents(base)
    for k in range(24):  # disjoint small writes in the first 2 * _SMALL_EXTENT bytes
        lo = k * (2 * _SMALL_EXTENT // 24) + rng.randrange(16)
        size = rng.choice([1, 17, 100, 200])
        ext.put(lo, lo + size, rng.randbytes(size + 3), 3)
    ext.put(2 * _SMALL_EXTENT + 5, 3 * _SMALL_EXTENT + 300, rng.randbytes(_SMALL_EXTENT + 295), 0)
    ext.put(3 * _SMALL_EXTENT + 400, 3 * _SMALL_EXTENT + 900, None, 0)  # zeros
    ext.put(4 * _SMALL_EXTENT, 6 * _SMALL_EXTENT, rng.randbytes(2 * _SMALL_EXTENT), 0)
    ext.grow(len(base) + _SMALL_EXTENT // 2)  # a zero tail
    return ext


@pytest.mark.parametrize("seed", range(8))
def test_digest_is_the_hash_of_the_joined_bytes(seed: int) -> None:
    ext = _image(seed)
    joined = ext.join()
    assert len(ext.parts) > 10  # (the mix this is about: many small extents between large ones)
    assert ext.digest() == xxhash.xxh3_128(joined).digest()
    rng = random.Random(seed)
    for _ in range(50):
        lo = rng.randrange(len(joined))
        length = rng.randrange(2 * _SMALL_EXTENT)
        h = xxhash.xxh3_128()
        ext.hash_range(h, lo, length)
        assert h.digest() == xxhash.xxh3_128(joined[lo:lo + length]).digest(), (lo, length)


def test_a_changed_byte_in_a_small_extent_changes_the_digest() -> None:
    ext = _image(1)
    before = ext.digest()
    a, b, src, off = next(p for p in ext.parts if p[2] is not None and p[1] - p[0] <= _SMALL_EXTENT)
    changed = bytearray(ext.join())
    changed[a] ^= 0xFF
    ext.put(a, a + 1, bytes(changed[a:a + 1]), 0)
    assert ext.digest() != before
    assert ext.digest() == xxhash.xxh3_128(bytes(changed)).digest()
