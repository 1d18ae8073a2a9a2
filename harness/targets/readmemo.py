"""The python target's memo of checks, recoveries and read-only opens keyed by the bytes they read: a result is reused on any image that agrees with an earlier one wherever that one was read.

Crash states of one sweep differ mostly in guest data (a kept or lost data write, a torn
sector), which neither a check nor a repair reads: both read metadata only. The image
memo (harness/imagememo.py) keys on every byte of the image, so it recomputes them; a
quarter to a third of the recoveries of a 512-byte-cluster sweep repeat a metadata
state seen before in the same example.

Why a hit is exact: a check or a recovery is a deterministic function of what it reads
from its file, of the file's size and of its arguments (options, recovery path, the
active injected bugs). It is run once on a `RecordingFile`, which notes the range of
every read. Another image of the same size whose bytes equal the first one's on every
one of those ranges makes every read return the same bytes, one read after another (a
read's result depends only on the original bytes it covers and on the writes before it,
which are the same by induction), so the run makes the same decisions, the same writes
and the same result. Comparing original bytes where the run read bytes it had itself
written is stricter than needed, never wrong.

What is replayed: a check's summary as it was; a recovery's messages, events and error
as they were, its writes and truncations applied to the new image's bytes, and its
host-operation log rebuilt over the new image; a read-only open's view from its read
plan (harness/targets/python.py, `ReadPlan`): the guest data it took straight from the
image bytes, without asking its file, is sliced again from the new image's bytes at the
same host offsets. A read-only open that never asked its file's size is keyed without it
(a shorter or longer image of one sweep shares the plan); a read past the end of one of
two images then hashes differently (`digest_of`).

Hazards:
- the ranges of one run are compared through an XXH3-128 digest of the bytes they cover
  (the image memo's own hash and collision argument);
- a recovery handed the raw image's check (`raw_check`) does not read what that check
  read: its read set is then extended with the check's, or the check is not handed over;
- memory: per call key, a bounded number of read sets and results, oldest dropped first.
"""

from __future__ import annotations

from collections import OrderedDict

import xxhash

from harness.crashstates.images import Extents

from models.qcow2 import inject

# Read sets tried per lookup (most recently used first): the crash states of one sweep
# share a handful of metadata layouts, and each try costs a digest of the ranges.
_TRIES = 6
_GROUPS_PER_CALL = 16
_RESULTS_PER_GROUP = 64
_MAX_BYTES = 16 << 20  # written bytes held by replayable recoveries, at most


def merged(reads: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """The distinct (offset, length) reads of a run, sorted: its read set.

    (Not merged into disjoint ranges: a byte covered twice is hashed twice, which changes
    nothing about what agrees, and deduplicating in C is what keeps recording cheap.)
    """
    return tuple(sorted(set(reads)))


def union(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted(set(a).union(b)))


def digest_of(data: bytes | bytearray | Extents, ranges: tuple[tuple[int, int], ...]) -> bytes:
    """XXH3-128 of `data` (image bytes, or an image laid out as `Extents`) over the (offset, length) `ranges`.

    A range past the end of `data` covers what exists. Two images of different sizes
    hash alike only if every range returned as many bytes on both: a larger image reads
    at least as much of every range, so one more byte anywhere makes a longer string.
    """
    h = xxhash.xxh3_128()
    if isinstance(data, Extents):  # (read where it lies, never joined: a 2 MiB-cluster image is tens of MiB)
        for offset, length in ranges:
            data.hash_range(h, offset, length)
        return h.digest()
    view = memoryview(data)
    for offset, length in ranges:
        h.update(view[offset:offset + length])
    return h.digest()


class ReadMemo:
    """Results by (call key, read set, digest of the image over that read set)."""

    def __init__(self) -> None:
        self._calls: dict[tuple, OrderedDict[tuple, OrderedDict[bytes, object]]] = {}
        self._weights: dict[int, int] = {}
        self._checks: list[tuple[bytes, tuple]] = []  # (image bytes, what their check read): the last check
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def call_key(*parts: object) -> tuple:
        return (inject.active(), *parts)

    def lookup(self, key: tuple, data: bytes) -> tuple[object, tuple] | None:
        """(result, its read set) of an earlier run that read what `data` holds at the same places, or None."""
        groups = self._calls.get(key)
        if groups:
            for ranges in list(reversed(groups))[:_TRIES]:
                table = groups[ranges]
                found = table.get(digest_of(data, ranges))
                if found is not None:
                    groups.move_to_end(ranges)
                    self.hits += 1
                    return found, ranges
        self.misses += 1
        return None

    def store(self, key: tuple, ranges: tuple, data: bytes, result: object, weight: int = 0) -> None:
        if weight > _MAX_BYTES // 4:
            return
        if self.bytes + weight > _MAX_BYTES:
            self.clear()
        groups = self._calls.setdefault(key, OrderedDict())
        table = groups.get(ranges)
        if table is None:
            table = groups[ranges] = OrderedDict()
            if len(groups) > _GROUPS_PER_CALL:
                _old, dropped = groups.popitem(last=False)
                for value in dropped.values():
                    self._forget(value)
        else:
            groups.move_to_end(ranges)
        table[digest_of(data, ranges)] = result
        if weight:
            self._weights[id(result)] = weight
            self.bytes += weight
        if len(table) > _RESULTS_PER_GROUP:
            _old, value = table.popitem(last=False)
            self._forget(value)

    def _forget(self, value: object) -> None:
        self.bytes -= self._weights.pop(id(value), 0)

    def note_check(self, data: bytes, ranges: tuple) -> None:
        """Remember what the check of these very bytes read, for a recovery handed that check (`check_reads`)."""
        self._checks = [(data, ranges)]  # one image only: with 2 MiB clusters each is tens of MiB

    def check_reads(self, data: bytes) -> tuple | None:
        return next((r for d, r in self._checks if d is data), None)

    def clear(self) -> None:
        self._calls.clear()
        self._weights.clear()
        self.bytes = 0


def replay_writes(data: bytes | Extents, ops: tuple[tuple[int, bytes | None], ...], image_for=None, *,
                  keep_extents: bool = False) -> bytes | Extents:
    """`data` with a run's writes (offset, bytes) and truncations (size, None) applied in order, as its file had them.

    Laid over `data` as extents and joined in one copy (a 2 MiB-cluster image is tens of MiB).
    With `image_for(digest, join)`, the caller is asked for the result by its XXH3-128
    digest (hashed over the extents) first: a caller holding those bytes already hands
    them back and nothing is joined (most crashes of one recovery recover to an image seen
    before); otherwise it calls `join`. With `keep_extents` (the caller's file would have
    laid the writes over the image as extents and handed them on so) the result stays
    `Extents`, never joined."""
    if not ops:
        return data
    image = data.copy() if type(data) is Extents else Extents(data)
    for offset, payload in ops:
        if payload is None:
            image.cut(offset)
            image.grow(offset)
        elif payload:
            image.grow(offset + len(payload))
            image.put(offset, offset + len(payload), payload, 0)
        else:
            image.grow(offset)  # (an empty write past the end grows a MemoryFile to its offset)
    join = (lambda: image) if keep_extents else image.join
    if image_for is not None:
        return image_for(image.digest(), join)
    return join()


__all__ = ["ReadMemo", "merged", "union", "digest_of", "replay_writes"]
