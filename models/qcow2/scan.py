"""Finding the non-zero entries of on-disk tables of big-endian u64 entries (L1, L2, refcount tables) in C.

With large clusters a table is one cluster of mostly zero entries (a 1 MiB L2 table holds
131,072, an 8 MiB disk uses 8 of them), and the check, the repair and the guest map walk
every table of every crash image. Walking 131,072 array items in Python, even through
itertools.compress, cost 1.5 ms a table; numpy's flatnonzero finds them in 0.2 ms. It
pays from a few KiB on; below that (512-byte clusters: 64 entries) numpy's per-call cost
is more than the walk, and the array walk stays.
"""

from __future__ import annotations

import array
import itertools
import sys

import numpy

__all__ = ["nonzero_bytes", "nonzero_u64_items", "nonzero_words", "u64_array"]

_NUMPY_FROM = 8192  # bytes of table from which numpy finds the non-zero entries
_BE_U64 = numpy.dtype(">u8")
_U64 = numpy.dtype("=u8")


_SPARSE_FROM = 8192  # words from which the non-zero ones are found block by block
_BLOCK = 1024  # words per block of that search


def nonzero_words(words: numpy.ndarray) -> numpy.ndarray:
    """Indices of the non-zero entries of a 1-D array of native u64 words, ascending.

    A 2 MiB L2 table is 262,144 words with a handful set: flatnonzero over all of them
    took 0.6 ms here, the maximum of each block of 1,024 words 0.09 ms, and then only the
    blocks holding a non-zero word are searched. A dense array (a quarter of its blocks
    set or more) is searched whole.
    """
    n = len(words)
    if n < _SPARSE_FROM:
        return numpy.flatnonzero(words)
    whole = n // _BLOCK * _BLOCK
    blocks = numpy.flatnonzero(words[:whole].reshape(-1, _BLOCK).max(axis=1)).tolist()
    if len(blocks) * 4 > whole // _BLOCK:
        return numpy.flatnonzero(words)
    parts = [numpy.flatnonzero(words[b * _BLOCK:(b + 1) * _BLOCK]) + b * _BLOCK for b in blocks]
    if whole < n:
        parts.append(numpy.flatnonzero(words[whole:]) + whole)
    return numpy.concatenate(parts) if parts else numpy.empty(0, dtype=numpy.intp)


def nonzero_u64_items(raw: bytes | bytearray) -> list[tuple[int, int]]:
    """(index, entry) for every non-zero big-endian u64 entry of `raw`, ascending (decoded at once: `raw` may change after)."""
    n = len(raw) // 8
    if len(raw) >= _NUMPY_FROM:
        where = nonzero_words(numpy.frombuffer(raw, dtype=_U64, count=n))  # (zero in either byte order)
        table = numpy.frombuffer(raw, dtype=_BE_U64, count=n)
        return list(zip(where.tolist(), table[where].tolist()))
    entries = u64_array(raw)
    return [(i, entries[i]) for i in itertools.compress(range(n), entries)]


def zero_from(raw: bytes | bytearray, start: int) -> bool:
    """Whether every byte of raw[start:] is zero. (A refcount block of a 2 MiB cluster past the end
    of its file: bytes.count took 1.1 ms for it here, numpy's any 0.085 ms.)"""
    if start >= len(raw):
        return True
    if len(raw) - start < _NUMPY_FROM:
        return raw.count(0, start) == len(raw) - start
    return not numpy.frombuffer(raw, dtype=numpy.uint8, offset=start).any()


_ZERO_ENTRY = array.array("Q", bytes(8))
_SPARSE_SHARE = 32  # a table with fewer than 1/32 of its entries set is decoded entry by entry


def u64_array(raw: bytes | bytearray) -> array.array:
    """The whole big-endian u64 entries of `raw` as an array, decoded in C (no int object per entry
    until one is read; a copy: `raw` may change after).

    A large sparse table (a refcount table, read at every open: 262,144 entries with 2 MiB
    clusters, a handful set) is made as zeros and its non-zero entries set: 136 us instead
    of 266 us for the byte-swapped copy (timeit)."""
    n = len(raw) // 8
    if len(raw) >= _NUMPY_FROM:
        where = nonzero_words(numpy.frombuffer(raw, dtype=_U64, count=n))
        if len(where) * _SPARSE_SHARE < n:
            out = _ZERO_ENTRY * n
            for i, e in zip(where.tolist(), numpy.frombuffer(raw, dtype=_BE_U64, count=n)[where].tolist()):
                out[i] = e
            return out
    out = array.array("Q")
    assert out.itemsize == 8, "array code 'Q' is not 64 bits wide here"
    out.frombytes(bytes(raw[: n * 8]))
    if sys.byteorder == "little":
        out.byteswap()
    return out


def nonzero_bytes(buf: bytes | bytearray, start: int, end: int) -> numpy.ndarray:
    """Positions of the non-zero bytes of buf[start:end], ascending, found a word at a time.

    A refcount block of a 1 MiB cluster is a million bytes, nearly all zero; numpy's
    flatnonzero over the bytes took 3.3 ms here, over 8-byte words 0.45 ms: the words
    are scanned, and only the non-zero ones are split into bytes.
    """
    data = numpy.frombuffer(buf, dtype=numpy.uint8, count=end - start, offset=start)
    whole = len(data) // 8 * 8
    words = nonzero_words(data[:whole].view(_U64))
    found = []
    if len(words):
        rows, cols = numpy.nonzero(data[:whole].reshape(-1, 8)[words])
        found.append(words[rows] * 8 + cols)
    if whole < len(data):
        found.append(numpy.flatnonzero(data[whole:]) + whole)
    if not found:
        return numpy.empty(0, dtype=numpy.intp)
    out = found[0] if len(found) == 1 else numpy.concatenate(found)
    return out + start
