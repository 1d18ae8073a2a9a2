"""Crash judging in the reference model: reading a recovered image back, sector verdicts, and adopting an accepted crash state."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from models.blockio import SECTOR
from models.payload import describe, identify_sector
from models.refhistory import SectorHistory, keys_in
from models.refops import Op
from models.refverdict import CollapseError, Mismatch, RefDiskError, SectorVerdict
from models.refvalues import ZERO_FINGERPRINT, ZERO_SECTOR, Val, crc32c

_MAX_READ_SECTORS = 2048  # judge() and collapse() read at most 1 MiB per read_fn call

ReadFn = Callable[[int, int], bytes]
"""read_fn(offset, length) -> bytes: reads `length` guest bytes of the recovered image."""


def judge_sector(history: SectorHistory, live: dict[int, Op], sector: int,
                 data: bytes | bytearray | memoryview) -> SectorVerdict | None:
    """None when a crash may leave `data` in `sector` (a checked sector of exactly 512 bytes); else the verdict."""
    fingerprint = crc32c(data)
    if history.find(sector, fingerprint) is not None:
        return None
    return classify(history, live, sector, fingerprint, data)


def judge(history: SectorHistory, live: dict[int, Op], read_fn: ReadFn, wanted: list[int]) -> list[SectorVerdict]:
    """The verdicts of the sorted `wanted` sectors that broke the contract, read back in runs."""
    verdicts: list[SectorVerdict] = []
    find = history.find
    durable = history.dur
    for start, view in read_runs(read_fn, wanted, "judge"):
        count = len(view) // SECTOR
        if view == ZERO_SECTOR * count:
            # All zeros (the common case for untouched space): only touched sectors can object.
            for sector in keys_in(durable, start, start + count):
                if find(sector, ZERO_FINGERPRINT) is None:
                    k = (sector - start) * SECTOR
                    verdicts.append(classify(history, live, sector, ZERO_FINGERPRINT, view[k : k + SECTOR]))
            continue
        for k in range(count):
            chunk = view[k * SECTOR : (k + 1) * SECTOR]
            if start + k not in durable and chunk == ZERO_SECTOR:
                continue  # untouched and zero
            fingerprint = crc32c(chunk)
            if find(start + k, fingerprint) is None:
                verdicts.append(classify(history, live, start + k, fingerprint, chunk))
    verdicts.sort(key=lambda v: v.sector)
    return verdicts


def judge_view(history: SectorHistory, live: dict[int, Op], view: dict[int, bytes],
               wanted: list[int]) -> list[SectorVerdict]:
    """`judge` on sectors already read (sector -> 512 bytes; absent sectors read zero), sector by sector.

    The same verdicts as `judge` over `read_view(view, ...)`: a zero sector objects only
    where the model has history and zeros are not allowed, any other value objects unless
    its fingerprint is allowed. The judge's read-only views are such dicts; joining them
    into runs to split them again cost more than the verdicts.
    """
    verdicts: list[SectorVerdict] = []
    find = history.find
    durable = history.dur
    get = view.get
    for sector in wanted:
        chunk = get(sector, ZERO_SECTOR)
        if chunk == ZERO_SECTOR:
            if sector in durable and find(sector, ZERO_FINGERPRINT) is None:
                verdicts.append(classify(history, live, sector, ZERO_FINGERPRINT, chunk))
            continue
        if len(chunk) != SECTOR:
            raise RefDiskError(f"judge: sector {sector} of the view holds {len(chunk)} bytes; a sector is exactly {SECTOR}")
        fingerprint = crc32c(chunk)
        if find(sector, fingerprint) is None:
            verdicts.append(classify(history, live, sector, fingerprint, chunk))
    return verdicts


def collapse(history: SectorHistory, live: dict[int, Op], read_fn: ReadFn) -> None:
    """Adopt the allowed value each pending sector holds; raises CollapseError, changing nothing, on any other."""
    chosen: dict[int, Val] = {}
    bad: list[SectorVerdict] = []
    for start, view in read_runs(read_fn, sorted(history.pending), "collapse"):
        for k in range(len(view) // SECTOR):
            sector = start + k
            chunk = view[k * SECTOR : (k + 1) * SECTOR]
            fingerprint = crc32c(chunk)
            value = history.find(sector, fingerprint)
            if value is None:
                bad.append(classify(history, live, sector, fingerprint, chunk))
            else:
                chosen[sector] = value
    if bad:
        raise CollapseError(bad)
    history.adopt(chosen)
    live.clear()


def classify(history: SectorHistory, live: dict[int, Op], sector: int, fingerprint: int,
             data: bytes | bytearray | memoryview) -> SectorVerdict:
    """The verdict on a value `sector` may not hold: stale-or-lost, foreign or garbage, and why."""
    origin = identify_sector(data)
    seen = describe(sector, data)
    lost = history.lost_maker(sector, fingerprint)
    if lost is not None:
        kind = Mismatch.STALE_OR_LOST
        reason = f"a value it held before its durable point ({lost.label}): data lost"
    elif fingerprint == ZERO_FINGERPRINT and data == ZERO_SECTOR:
        kind = Mismatch.STALE_OR_LOST
        reason = "but no durable value or pending zeroing allows zeros here: data lost"
    elif origin is not None:
        kind = Mismatch.FOREIGN
        reason = f"which was never allowed in sector {sector}"
    else:
        kind = Mismatch.GARBAGE
        reason = "not a value any operation wrote here"
    return SectorVerdict(sector, kind, fingerprint, origin, tuple(history.allowed(sector, live)), seen, reason)


def read_runs(read_fn: ReadFn, sectors: list[int], what: str) -> Iterator[tuple[int, memoryview]]:
    """Read sorted `sectors` in runs of consecutive ones (at most 1 MiB each); yield (first sector, the run's bytes)."""
    i = 0
    n = len(sectors)
    while i < n:
        start = sectors[i]
        j = i + 1
        while j < n and sectors[j] == start + (j - i) and j - i < _MAX_READ_SECTORS:
            j += 1
        count = j - i
        data = read_fn(start * SECTOR, count * SECTOR)
        if len(data) != count * SECTOR:
            raise RefDiskError(
                f"{what}: read_fn({start * SECTOR}, {count * SECTOR}) returned {len(data)} bytes; "
                "it must return exactly the bytes asked for"
            )
        yield start, memoryview(data)
        i = j
