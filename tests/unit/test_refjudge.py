"""Unit tests for the reference disk's crash judging: verdicts per sector (foreign, stale-or-lost, garbage), collapse, copy and digest."""

from __future__ import annotations

import re

import pytest

from models.payload import SectorOrigin, make_payload, payload_sector
from models.refdisk import (
    ZERO_FINGERPRINT,
    CollapseError,
    InvalidRequest,
    Mismatch,
    RefDiskError,
    ReferenceDisk,
    crc32c,
)
from tests.unit._refdisk_tools import SEED, MiB, origins, pw, reader

# --------------------------------------------------------------------------- judging


def test_judge_accepts_every_allowed_combination_per_sector() -> None:
    disk = ReferenceDisk(MiB, "writeback")
    pw(disk, 0, 0, 2048)
    disk.flush(op_index=1)
    pw(disk, 2, 512, 1024)
    image = bytearray(disk.read(0, MiB))
    image[512:1024] = payload_sector(0, 1, SEED)  # sector 1 kept its durable value; sector 2 took write #2
    assert disk.judge(reader(image)) == []


def test_judge_foreign_from_another_sector() -> None:
    disk = ReferenceDisk(MiB)
    pw(disk, 0, 0, 4096)
    disk.flush(op_index=1)
    pw(disk, 2, 512 * 42, 512)
    image = bytearray(disk.read(0, MiB))
    image[17 * 512 : 18 * 512] = payload_sector(2, 42, SEED)
    pw(disk, 3, 17 * 512, 512)  # so that sector 17 has history and is judged by default
    disk.flush(op_index=4)
    [verdict] = disk.judge(reader(image))
    assert verdict.sector == 17
    assert verdict.kind is Mismatch.FOREIGN
    assert verdict.origin == SectorOrigin(2, 42, SEED)
    fp = crc32c(payload_sector(2, 42, SEED))
    fp3 = crc32c(payload_sector(3, 17, SEED))
    assert str(verdict) == (
        f"foreign: sector 17 holds the data of write #2 to sector 42 [crc32c {fp:#010x}], "
        f"which was never allowed in sector 17; allowed: durable (write #3) [crc32c {fp3:#010x}]"
    )


def test_judge_foreign_from_another_operation_on_the_same_sector() -> None:
    disk = ReferenceDisk(MiB)
    pw(disk, 0, 0, 512)
    verdict = disk.judge_sector(0, payload_sector(9, 0, SEED))
    assert verdict is not None and verdict.kind is Mismatch.FOREIGN
    assert verdict.origin == SectorOrigin(9, 0, SEED)
    assert verdict.seen == "sector 0 holds the data of write #9 to sector 0"


def test_judge_stale_value_from_before_the_durable_point() -> None:
    disk = ReferenceDisk(MiB)
    pw(disk, 0, 0, 512)
    disk.flush(op_index=1)
    pw(disk, 2, 0, 512)
    disk.flush(op_index=3)
    verdict = disk.judge_sector(0, payload_sector(0, 0, SEED))
    assert verdict is not None
    assert verdict.kind is Mismatch.STALE_OR_LOST
    assert verdict.reason == "a value it held before its durable point (write #0): data lost"


def test_judge_lost_data_reads_zeros() -> None:
    disk = ReferenceDisk(MiB)
    pw(disk, 0, 0, 512)
    disk.flush(op_index=1)
    verdict = disk.judge_sector(0, bytes(512))
    assert verdict is not None
    assert verdict.kind is Mismatch.STALE_OR_LOST
    assert verdict.seen == "sector 0 holds zeros"
    fp = crc32c(payload_sector(0, 0, SEED))
    assert str(verdict) == (
        f"stale-or-lost: sector 0 holds zeros [crc32c {ZERO_FINGERPRINT:#010x}], but no durable value or pending "
        f"zeroing allows zeros here: data lost; allowed: durable (write #0) [crc32c {fp:#010x}]"
    )


def test_judge_of_an_all_zero_image_finds_every_lost_sector() -> None:
    disk = ReferenceDisk(MiB)
    pw(disk, 0, 4096, 1024)
    disk.flush(op_index=1)
    verdicts = disk.judge(reader(bytes(MiB)))
    assert [(v.sector, v.kind) for v in verdicts] == [(8, Mismatch.STALE_OR_LOST), (9, Mismatch.STALE_OR_LOST)]


def test_a_payload_written_to_another_sector_is_kept_byte_exact() -> None:
    disk = ReferenceDisk(MiB)
    moved = payload_sector(3, 9, SEED)  # written to sector 2, e.g. by a guest copying data
    disk.write(2 * 512, moved, op_index=0)
    disk.flush(op_index=1)
    assert disk.read(2 * 512, 512) == moved
    assert disk.judge_sector(2, moved) is None
    assert disk.judge_sector(2, payload_sector(3, 2, SEED)) is not None


def test_judge_zeros_of_a_superseded_discard_are_stale() -> None:
    disk = ReferenceDisk(MiB, "writeback")
    pw(disk, 0, 0, 512)
    disk.discard(0, 512, op_index=1)
    pw(disk, 2, 0, 512)
    disk.flush(op_index=3)
    verdict = disk.judge_sector(0, bytes(512))
    assert verdict is not None
    assert verdict.kind is Mismatch.STALE_OR_LOST
    assert verdict.reason == "a value it held before its durable point (discard #1 (zeros)): data lost"


def test_judge_garbage_and_corrupted_payload() -> None:
    disk = ReferenceDisk(MiB)
    pw(disk, 0, 0, 512)
    disk.flush(op_index=1)
    corrupted = bytearray(payload_sector(0, 0, SEED))
    corrupted[200] ^= 0x80
    verdict = disk.judge_sector(0, bytes(corrupted))
    assert verdict is not None
    assert verdict.kind is Mismatch.GARBAGE
    assert verdict.origin is None
    assert verdict.seen == "sector 0 holds unidentified data"
    assert verdict.reason == "not a value any operation wrote here"


def test_judge_untouched_sectors_only_when_asked() -> None:
    disk = ReferenceDisk(MiB)
    image = bytearray(MiB)
    image[5 * 512] = 1
    assert disk.judge(reader(image)) == []
    [verdict] = disk.judge(reader(image), sectors=range(0, 10))
    assert (verdict.sector, verdict.kind) == (5, Mismatch.GARBAGE)
    assert [str(a) for a in verdict.allowed] == [f"durable (initial zeros) [crc32c {ZERO_FINGERPRINT:#010x}]"]


def test_judge_rejects_a_short_read() -> None:
    disk = ReferenceDisk(MiB)
    pw(disk, 0, 0, 1024)
    with pytest.raises(RefDiskError, match=r"^judge: read_fn\(0, 1024\) returned 512 bytes; it must return exactly"):
        disk.judge(lambda offset, length: bytes(512))


# --------------------------------------------------------------------------- collapse, copy, digest


def test_collapse_adopts_the_values_the_crash_left() -> None:
    disk = ReferenceDisk(MiB, "writeback")
    pw(disk, 0, 0, 1024)
    disk.flush(op_index=1)
    pw(disk, 2, 0, 1024)
    pw(disk, 3, 1024, 512, begin_only=True)
    image = bytearray(disk.read(0, MiB))
    image[0:512] = payload_sector(0, 0, SEED)  # sector 0 lost write #2 (allowed: it was not flushed)
    image[1024:1536] = bytes(512)  # in-flight write #3 did not land
    assert disk.judge(reader(image)) == []
    disk.collapse(reader(image))
    assert disk.read(0, MiB) == bytes(image)
    assert disk.pending_sectors() == frozenset()
    assert disk.live_ops() == {}
    assert origins(disk, 0) == ["durable=write #0"]
    assert origins(disk, 1) == ["durable=write #2"]
    with pytest.raises(InvalidRequest, match=r"^complete #3: operation #3 is not in flight"):
        disk.complete(3)
    # What the crash dropped is now stale.
    verdict = disk.judge_sector(0, payload_sector(2, 0, SEED))
    assert verdict is not None and verdict.kind is Mismatch.STALE_OR_LOST


def test_collapse_refuses_a_value_that_is_not_allowed_and_changes_nothing() -> None:
    disk = ReferenceDisk(MiB)
    pw(disk, 0, 0, 1024)
    before = disk.digest()
    image = bytearray(disk.read(0, MiB))
    image[0:512] = payload_sector(0, 1, SEED)
    with pytest.raises(CollapseError) as info:
        disk.collapse(reader(image))
    assert [v.sector for v in info.value.verdicts] == [0]
    assert re.match(r"^collapse: 1 sector\(s\) hold values the crash contract does not allow: foreign: ", str(info.value))
    assert str(info.value).endswith("Call judge() first and report those; collapse() only accepts a crash state that judge() accepts")
    assert disk.digest() == before


def test_copy_is_independent() -> None:
    disk = ReferenceDisk(MiB)
    pw(disk, 0, 0, 1024)
    snapshot = disk.copy()
    before = snapshot.digest()
    assert before == disk.digest()
    disk.flush(op_index=1)
    pw(disk, 2, 0, 512)
    image = bytearray(MiB)
    assert snapshot.digest() == before
    assert snapshot.read(0, 1024) == make_payload(0, 0, 1024, SEED)
    assert origins(snapshot, 0) == ["durable=initial zeros", "write #0"]
    snapshot.collapse(reader(image))
    assert disk.read(0, 512) == payload_sector(2, 0, SEED)
    assert snapshot.read(0, 1024) == bytes(1024)


def test_digest_is_stable_and_sensitive() -> None:
    def build(last: int) -> ReferenceDisk:
        disk = ReferenceDisk(MiB)
        pw(disk, 0, 0, 4096)
        disk.flush(op_index=1)
        pw(disk, 2, last, 512)
        return disk

    assert build(0).digest() == build(0).digest()
    assert build(0).digest() != build(512).digest()
    flushed = build(0)
    flushed.flush(op_index=3)
    assert flushed.digest() != build(0).digest()
    # Written, zeroed and flushed hashes like never touched.
    cleared = ReferenceDisk(MiB)
    cleared.write(0, b"q" * 512)
    cleared.write_zeroes(0, 512)
    cleared.flush()
    assert cleared.digest() == ReferenceDisk(MiB).digest()
    assert ReferenceDisk(MiB, "writethrough").digest() != ReferenceDisk(MiB).digest()


@pytest.mark.parametrize("seed", range(8))
def test_judge_view_gives_judges_verdicts(seed: int) -> None:
    _compare_judge_view(seed)


def _compare_judge_view(seed: int) -> int:
    # judge_view (the judge's path: sectors already read) against judge over the same
    # bytes joined into runs, on a seeded disk with durable, pending, foreign, garbage,
    # stale and zero sectors, with and without gaps in the view.
    import random

    from harness.judge import read_view

    rng = random.Random(seed)
    disk = ReferenceDisk(MiB, "writeback")
    for op in range(6):
        pw(disk, op, rng.randrange(0, 64) * 512, rng.choice((512, 1024, 4096)))
        if rng.random() < 0.4:
            disk.flush(op_index=100 + op)
    image = bytearray(disk.read(0, MiB))
    sectors = sorted(rng.sample(range(80), 60))
    for s in rng.sample(sectors, 12):
        image[s * 512:(s + 1) * 512] = rng.choice((bytes(512), rng.randbytes(512), payload_sector(0, (s + 3) % 80, SEED)))
    view = {s: bytes(image[s * 512:(s + 1) * 512]) for s in sectors}
    want = disk.judge(lambda off, length: read_view(view, off, length), sorted(view))
    got = disk.judge_view(view)
    assert [(v.sector, v.kind, v.observed_fingerprint, v.message) for v in got] == \
        [(v.sector, v.kind, v.observed_fingerprint, v.message) for v in want]
    return len(want)


def test_judge_view_cases_object() -> None:
    # The comparison above is not vacuous: its seeded views hold sectors the model refuses.
    assert sum(_compare_judge_view(seed) for seed in range(8)) > 0


@pytest.mark.parametrize("seed", range(6))
def test_snapshot_mismatch_view_agrees_with_mismatch(seed: int) -> None:
    # The snapshot rule on sectors read up front (mismatch_view, the judge's path) against
    # the one-by-one rule, on a seeded disk with a snapshot and reads that keep, change,
    # zero or foreign-fill some of its sectors.
    import random

    rng = random.Random(seed)
    disk = ReferenceDisk(MiB, "writeback")
    for op in range(4):
        pw(disk, op, rng.randrange(0, 64) * 512, rng.choice((512, 2048)))
    disk.flush(op_index=10)
    disk.begin_snapshot_create(11, "s")
    disk.complete(11)
    view = disk.snapshot_view("s")
    sectors = sorted(rng.sample(range(80), 40))
    image = bytearray(disk.read(0, MiB))
    if seed % 2:
        s = rng.choice(sorted(set(view) | set(sectors)))
        image[s * 512:(s + 1) * 512] = rng.choice((bytes(512), rng.randbytes(512), payload_sector(0, s + 1, SEED)))
    got = {s: bytes(image[s * 512:(s + 1) * 512]) for s in set(sectors) | set(view)}
    want = disk.snapshot_mismatch("s", reader(image), sectors)
    assert (disk.snapshot_mismatch_view("s", got, sectors) or None) == want
    # A view that lacks a sector is refused, not judged.
    if got:
        del got[min(got)]
        assert disk.snapshot_mismatch_view("s", got, sectors) is None
