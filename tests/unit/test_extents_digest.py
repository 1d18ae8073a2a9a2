"""`Extents.digest` and `hash_range` hash what `join` returns, whatever mix of small, large and zero extents lies there."""

from __future__ import annotations

import random

import pytest
import xxhash

from harness import imagememo
from harness.crashstates.images import (_SMALL_EXTENT, CHUNK, CHUNKED_ABOVE, ChunkDigests, CrashImageBuilder, Extents,
                                        digest_bytes)
from harness.crashstates.state import CrashState, Policy
from harness.faultfile import HostOpKind, WriteLog
from models.blockio import WriteSite


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


# Above CHUNKED_ABOVE an image's digest is taken over its chunks, and a chunk taken whole from
# an immutable base reuses that base chunk's digest (`ChunkDigests`). Each image below is
# checked against `digest_bytes` of its joined bytes, which hashes every chunk afresh.

def _large_base(seed: int) -> bytes:
    return random.Random(seed).randbytes(CHUNKED_ABOVE + 3 * CHUNK + 1000)


def _shapes(base: bytes, rng: random.Random):
    """Images over one base and one ChunkDigests: each is (name, Extents)."""
    chunks = ChunkDigests.for_base(base)
    assert chunks is not None
    plain = Extents(base, chunks)
    yield "the base", plain
    written = plain.copy()
    for _ in range(5):
        lo = rng.randrange(len(base) - 100)
        written.put(lo, lo + 64, rng.randbytes(64), 0)
    yield "small writes", written
    shifted = plain.copy()  # a chunk from the base, but not at its own offset
    shifted.put(CHUNK, 2 * CHUNK, base, 0)
    yield "base bytes moved", shifted
    for cut in (len(base) - 10, len(base) - CHUNK // 2, CHUNKED_ABOVE + 1):
        short = plain.copy()
        short.cut(cut)
        yield f"cut to {cut}", short
    grown = plain.copy()
    grown.grow(len(base) + CHUNK // 3)  # the base's last chunk is no longer the image's
    yield "grown past the base", grown
    regrown = plain.copy()  # cut inside the last chunk, then grown with zeros back to the base's size
    regrown.cut(len(base) - 500)
    regrown.grow(len(base))
    yield "cut and regrown", regrown


@pytest.mark.parametrize("seed", range(3))
def test_a_large_images_digest_is_digest_bytes_of_its_bytes_whatever_its_chunks_share(seed: int) -> None:
    base = _large_base(seed)
    rng = random.Random(seed)
    digests = {}
    for name, ext in _shapes(base, rng):
        joined = ext.join()
        assert ext.digest() == digest_bytes(joined), name
        assert ext.digest() == Extents(joined).digest(), name  # (no shared chunks at all)
        assert imagememo.digest(joined) == imagememo.digest(ext), name
        digests[name] = ext.digest()
    assert len(set(digests.values())) == len(digests)  # every shape has other bytes


def test_digest_bytes_is_plain_xxh3_up_to_the_threshold_and_chunked_above() -> None:
    small = random.Random(1).randbytes(CHUNKED_ABOVE)
    assert digest_bytes(small) == xxhash.xxh3_128_digest(small)
    large = small + b"x"
    assert digest_bytes(large) != xxhash.xxh3_128_digest(large)
    changed = bytearray(large)
    changed[CHUNK + 7] ^= 1
    assert digest_bytes(bytes(changed)) != digest_bytes(large)
    assert digest_bytes(large + bytes(1)) != digest_bytes(large)  # (the size is in the digest)


def test_a_bytearray_base_shares_no_chunk_digests() -> None:
    """A buffer that can change under its extents never lends its chunks' digests."""
    buf = bytearray(_large_base(4))
    assert ChunkDigests.for_base(buf) is None
    ext = Extents(buf)
    before = ext.digest()
    buf[5] ^= 1
    assert ext.digest() != before
    assert ext.digest() == digest_bytes(bytes(buf))


def test_crash_images_of_a_large_log_digest_as_their_bytes() -> None:
    """The builder's images share its base's chunk digests: each state's digest is still its bytes'."""
    base = _large_base(5)
    rng = random.Random(5)
    log = WriteLog(base=base)
    size = len(base)
    for _ in range(6):
        lo = rng.randrange(len(base) + CHUNK)
        data = rng.randbytes(rng.choice([512, 4096, CHUNK + 512]))
        size = max(size, lo + len(data))
        log.append(HostOpKind.WRITE, lo, data, WriteSite.OTHER, size)
    log.append(HostOpKind.TRUNCATE, len(base) - 3000, b"", WriteSite.OTHER, len(base) - 3000)
    builder = CrashImageBuilder(log)
    point = len(log.ops)
    ops = list(range(6))
    for kept in ([], ops[:2], ops[1::2], ops + [6], [6]):
        state = CrashState(point=point, policy=Policy.SUBSETS, kept=tuple(kept))
        image, key = builder.image_and_digest(state)
        assert key == digest_bytes(builder.build_bytes(state)), kept
        assert key == imagememo.digest(image), kept


def test_copies_share_the_base_chunks_and_hash_each_once() -> None:
    """What the chunks are for: after the first image, a copy with a small write hashes the base no more."""
    base = _large_base(6)
    chunks = ChunkDigests.for_base(base)
    ext = Extents(base, chunks)
    ext.digest()
    whole = len(chunks.digests)
    assert whole == -(-len(base) // CHUNK)
    seen = dict(chunks.digests)
    other = ext.copy()
    other.put(CHUNK + 3, CHUNK + 70, b"y" * 67, 0)
    calls = []

    class Counting(dict):
        def get(self, key, default=None):
            calls.append(key)
            return super().get(key, default)

    chunks.digests = Counting(seen)
    other.digest()
    assert len(calls) == whole - 1  # every chunk but the written one came from the base's digests
    assert chunks.digests == seen  # (and none was hashed again)


def test_a_chunk_of_a_written_buffer_is_hashed_once_while_its_log_lives() -> None:
    """A large write lies in every crash image that keeps it: its chunks' digests are kept by (op, offset), checked
    against the log's own buffer, and not used once the log is gone."""
    import gc

    base = _large_base(7)
    log = WriteLog(base=base)
    data = random.Random(7).randbytes(4 * CHUNK)
    op = log.append(HostOpKind.WRITE, CHUNK, data, WriteSite.OTHER, len(base))
    chunks = ChunkDigests.for_base(log.base, log)
    assert chunks.of_source(op.data, CHUNK, CHUNK) == xxhash.xxh3_128_digest(data[CHUNK:2 * CHUNK])
    assert chunks.of_source(bytes(bytearray(data)), 0, CHUNK) is None  # equal bytes, but not the log's buffer
    chunks._ids[id(base)] = op.index  # (as if a freed buffer's id came back on another object)
    assert chunks.of_source(base, 0, CHUNK) is None
    ext = Extents(log.base, chunks)
    ext.apply(op, None, None)
    assert ext.digest() == digest_bytes(ext.join())
    assert len(chunks._written) == 4  # every chunk of the write, hashed once
    assert ext.copy().digest() == ext.digest() and len(chunks._written) == 4
    builder_less = Extents(ext.join())
    assert builder_less.digest() == ext.digest()
    grown = log.append(HostOpKind.WRITE, len(base) - 500, data[:2 * CHUNK + 700], WriteSite.OTHER,
                       len(base) + 2 * CHUNK + 200)
    longer = ext.copy()
    longer.apply(grown, None, None)  # (the image now ends inside a chunk that the write holds whole)
    assert longer.size % CHUNK and longer.digest() == digest_bytes(longer.join())
    assert any(length < CHUNK for _k, _off, length in chunks._written)
    del log, op, grown
    gc.collect()
    assert chunks.of_source(data, 0, CHUNK) is None  # (the log is gone: nothing vouches for an id)
    assert ext.digest() == digest_bytes(ext.join())


def test_a_large_image_of_zeros_without_a_base_digests_as_its_bytes() -> None:
    """An image grown from nothing is one zero part (src None) and has no chunk digests (chunks None): the
    base test must not take that None source for a base."""
    ext = Extents(b"")
    ext.grow(CHUNKED_ABOVE + CHUNK + 9)
    assert ext.chunks is None and ext.parts[0][2] is None
    assert ext.digest() == digest_bytes(bytes(ext.size))
