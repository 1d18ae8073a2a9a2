"""The compare pass's memo: one refcount block's verdict and repair, keyed by everything they depend on.

A crash sweep repairs the same dirty image again and again: neighbouring crash states
and every crash of a recovery differ in a few metadata bytes, and a nightly 512-byte
image leaks the same thousand clusters in each of them. compare_refcounts on one block
(`refcounts._compare_block`) is a pure function of: the block's offset and bytes, the
candidate clusters, their computed refcounts, the fix mode, the geometry, and the
active injected bugs, with one exception checked on every use: a freed cluster that
is a cached refcount block sends the block to QEMU's cluster loop instead (so does
a block whose lookup fails; neither is memoised). Measured on a nightly example, 99.6%
of the blocks compared were seen before in the same process.

What a verdict replays: the printed lines (the same Finding objects, which nobody
mutates), the counters it added, the block's bytes after the repair, and the freed
clusters' zeroing in ascending order, as the compare would have done them.

Hazards: the memo is process-wide and bounded (least recently used first; blocks of
64 KiB at most, and 16 MiB of repaired blocks and keys). A block's bytes are a key
only below `_MAX_KEY_BYTES`; larger blocks (8 KiB to 64 KiB clusters) are keyed by a
BLAKE2b-128 digest (a collision would replay another block's verdict: about
2**-64 over a night, as the judge's image memo accepts).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from itertools import repeat

import xxhash

from models.qcow2 import inject
from models.qcow2.check.result import FIX_LEAKS, Kind
from models.qcow2.check.state import RefcountIOError, cluster_runs

_MAX_ENTRIES = 8192
_MAX_KEY_BYTES = 4096  # blocks up to this size are their own key; larger ones are digested
_MAX_BLOCK = 65536  # larger blocks (2 MiB clusters: one or two per image) are not memoised: each
# replay would keep a 2 MiB copy of the repaired block, and their compare is few and vectorised
_MAX_CANDIDATES = 8192  # a block with more candidates is compared without the memo (its key would be large)
_REPAIRED = Kind.REPAIRED

_MAX_BYTES = 16 << 20  # repaired blocks and block keys held, at most

_memo: OrderedDict[tuple, tuple] = OrderedDict()
stats = {"hits": 0, "misses": 0, "bytes": 0, "pass_hits": 0, "pass_misses": 0, "pass_lines": 0}

# Whole dry passes (`dry_pass`): at most this many, holding at most this many printed lines in all
# (each a reference to a Finding the pass made, most of them shared with the block memo's entries).
_MAX_PASSES = 1024
_MAX_PASS_LINES = 1 << 20
_passes: OrderedDict[tuple, tuple] = OrderedDict()


def clear() -> None:
    _memo.clear()
    stats["bytes"] = 0
    _passes.clear()
    stats["pass_lines"] = 0


def _weight(key: tuple, value: tuple) -> int:
    after, computed = value[3], key[7]
    return len(key[6]) + (len(after) if after is not None else 0) + (
        len(computed) if type(computed) is bytes else 8 * len(computed))


def compare_block(s, imrt, fix: int, block_index: int, clusters, compute, signature: bytes | None = None):
    """`compute(s, imrt, fix, block_index, clusters)` (refcounts._compare_block), answered from the memo when it can be.

    With `signature`, the IMRT's counts of every cluster of the block (as far as the
    compare goes) as native u64 bytes (`Imrt.dense`), the key holds them instead of the
    candidates and their counts (which they determine, with the block's bytes), and
    `clusters` is a callable that gives the candidates, called only when the memo misses.
    """
    if signature is None:
        if len(clusters) > _MAX_CANDIDATES or s.cs > _MAX_BLOCK:
            return compute(s, imrt, fix, block_index, clusters)
        computed: tuple = (tuple(clusters), tuple(map(imrt.counts.get, clusters, repeat(0))))
    else:
        if s.cs > _MAX_BLOCK:
            return compute(s, imrt, fix, block_index, clusters())
        if len(signature) > _MAX_KEY_BYTES:
            signature = hashlib.blake2b(signature, digest_size=16).digest()
        computed = (signature,)
    try:
        offset = s.refblock_offset(block_index)
    except RefcountIOError:
        return None  # as compute: the cluster loop emits one error per cluster
    if offset:
        s.decoded_refblock(offset)  # loads and decodes the block exactly as compute would
        content = bytes(s.raw_refblock(offset))
    else:
        content = b""
    if len(content) > _MAX_KEY_BYTES:
        content = hashlib.blake2b(content, digest_size=16).digest()
    key = (inject.active(), s.order, s.rb_entries, s.cs, block_index, offset, content, *computed, fix)
    found = _memo.get(key)
    if found is not None:
        _memo.move_to_end(key)
        return _replay(s, offset, fix, found)
    stats["misses"] += 1
    if signature is not None:
        clusters = clusters()
    res = s.res
    before = (res.corruptions, res.leaks, res.corruptions_fixed, res.leaks_fixed)
    start = len(s.findings)
    done = compute(s, imrt, fix, block_index, clusters)
    if done is None:
        return None
    lines = tuple(s.findings[start:])
    added = (res.corruptions - before[0], res.leaks - before[1], res.corruptions_fixed - before[2],
             res.leaks_fixed - before[3])
    freed = [f.cluster for f in lines if f.kind is _REPAIRED and f.reference == 0]
    after = bytes(s.raw_refblock(offset)) if offset and any(f.kind is _REPAIRED for f in lines) else None
    cs = s.cs
    value = _memo[key] = (done, lines, added, after, cluster_runs(freed), frozenset(c * cs for c in freed) - {offset})
    stats["bytes"] += _weight(key, value)
    while len(_memo) > _MAX_ENTRIES or stats["bytes"] > _MAX_BYTES:
        stats["bytes"] -= _weight(*_memo.popitem(last=False))
    return done


def _replay(s, offset: int, fix: int, found: tuple):
    done, lines, added, after, runs, freed_offsets = found
    if freed_offsets and fix & FIX_LEAKS and not s.refblocks.tables.keys().isdisjoint(freed_offsets):
        return None  # a freed cluster is a cached refcount block: the cluster loop drops and re-reads it
    stats["hits"] += 1
    s.findings.extend(lines)
    res = s.res
    res.corruptions += added[0]
    res.leaks += added[1]
    res.corruptions_fixed += added[2]
    res.leaks_fixed += added[3]
    if after is not None:
        s.replace_refblock(offset, after)
    for first, count in runs:
        s.discard_clusters(first * s.cs, count)
    return done



def dry_pass(s, disk, comp, compute) -> bool:
    """A dry compare pass (nothing fixed) over whole arrays: `compute()` (the per-block loop), or its verdict replayed.

    A pass that fixes nothing writes nothing and loads nothing its arrays did not: what
    it adds (the printed lines, the counters and whether a rebuild is needed) is a
    function of the on-disk refcounts and the IMRT's counts of every cluster it compares
    (`disk` and `comp`, the vectorised compare's native u64 arrays, whose lookups were
    all checked before: no block signals an error), of the geometry and of the active
    injected bugs. The crash images of one sweep repeat those arrays (a nightly
    512-byte-cluster example with 64-bit refcounts: 926 distinct pairs in 1,884 dry
    passes), and each pass replayed block by block cost a memo lookup per block that
    leaked. Keyed by XXH3-128 digests of both arrays (the image memo's hash and its
    collision argument, harness/imagememo.py).
    """
    key = (inject.active(), s.order, s.rb_entries, s.cs, len(comp),
           xxhash.xxh3_128_digest(disk), xxhash.xxh3_128_digest(comp))
    res = s.res
    found = _passes.get(key)
    if found is not None:
        _passes.move_to_end(key)
        stats["pass_hits"] += 1
        rebuild, lines, added = found
        s.findings.extend(lines)
        res.corruptions += added[0]
        res.leaks += added[1]
        return rebuild
    stats["pass_misses"] += 1
    before = (res.corruptions, res.leaks, res.corruptions_fixed, res.leaks_fixed)
    start = len(s.findings)
    rebuild = compute()
    if (res.corruptions_fixed, res.leaks_fixed) != before[2:]:
        raise AssertionError("blockmemo.dry_pass: a dry compare pass fixed something")
    lines = tuple(s.findings[start:])
    _passes[key] = (rebuild, lines, (res.corruptions - before[0], res.leaks - before[1]))
    stats["pass_lines"] += len(lines)
    while len(_passes) > _MAX_PASSES or stats["pass_lines"] > _MAX_PASS_LINES:
        stats["pass_lines"] -= len(_passes.popitem(last=False)[1][1])
    return rebuild
