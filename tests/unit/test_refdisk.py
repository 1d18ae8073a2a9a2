"""Unit tests for models.payload and models.refdisk: payload identity, the durability rules per cache mode, discard alignment, in-flight operations, verdicts and errors."""

from __future__ import annotations

import re

import pytest

from models.payload import (
    PayloadError,
    SectorOrigin,
    describe,
    describe_origin,
    identify_sector,
    make_payload,
    payload_sector,
)
from models.refdisk import (
    ZERO_FINGERPRINT,
    CollapseError,
    InvalidRequest,
    Mismatch,
    RefDiskError,
    ReferenceDisk,
    crc32c,
)

SEED = 7
MiB = 1 << 20


def reader(image: bytes | bytearray):
    return lambda offset, length: bytes(image[offset : offset + length])


def origins(disk: ReferenceDisk, sector: int) -> list[str]:
    return [a.origin if a.state != "durable" else f"durable={a.source}" for a in disk.allowed(sector)]


def pw(disk: ReferenceDisk, op: int, offset: int, length: int, *, begin_only: bool = False) -> bytes:
    """Payload write of operation `op`; returns the data."""
    data = make_payload(op, offset, length, SEED)
    disk.begin_write(op, offset, data)
    if not begin_only:
        disk.complete(op)
    return data


# --------------------------------------------------------------------------- payloads


def test_payload_is_deterministic_and_self_identifying() -> None:
    data = make_payload(5, 42 * 512, 1024, SEED)
    assert data == make_payload(5, 42 * 512, 1024, SEED)
    assert identify_sector(data[:512]) == SectorOrigin(5, 42, SEED)
    assert identify_sector(data[512:]) == SectorOrigin(5, 43, SEED)
    assert data[:512] == payload_sector(5, 42, SEED)
    assert data[:8] == b"QCRASHPL"


def test_unaligned_payload_is_the_slice_of_the_sector_images() -> None:
    aligned = make_payload(3, 0, 4 * 512, SEED)
    assert make_payload(3, 700, 1000, SEED) == aligned[700:1700]
    assert make_payload(3, 511, 1, SEED) == aligned[511:512]
    assert make_payload(3, 100, 0, SEED) == b""


def test_payload_differs_by_op_sector_and_seed() -> None:
    base = payload_sector(1, 2, 3)
    assert len({base, payload_sector(9, 2, 3), payload_sector(1, 9, 3), payload_sector(1, 2, 9)}) == 4
    # The fill differs too, not just the header.
    assert base[32:] != payload_sector(9, 2, 3)[32:]


def test_identify_refuses_corrupted_and_non_payload_sectors() -> None:
    good = bytearray(payload_sector(5, 42, SEED))
    for pos in (0, 9, 20, 31, 32, 300, 511):
        bad = bytearray(good)
        bad[pos] ^= 0x01
        assert identify_sector(bad) is None, pos
    assert identify_sector(bytes(512)) is None
    assert identify_sector(b"QCRASHPL" + bytes(504)) is None


def test_identify_needs_a_whole_sector() -> None:
    with pytest.raises(PayloadError, match=r"^identify_sector: got 511 bytes; a sector is exactly 512 bytes$"):
        identify_sector(bytes(511))


def test_make_payload_errors_name_the_field_and_rule() -> None:
    with pytest.raises(PayloadError, match=r"^make_payload: offset -1 is negative; guest offsets must be >= 0$"):
        make_payload(0, -1, 10, 0)
    with pytest.raises(PayloadError, match=r"^make_payload: length -5 is negative; lengths must be >= 0$"):
        make_payload(0, 0, -5, 0)
    with pytest.raises(
        PayloadError,
        match=r"^make_payload: seed -1 is out of range; it must fit an unsigned 64-bit integer \(0\.\.2\*\*64-1\)$",
    ):
        make_payload(0, 0, 1, -1)


def test_describe_messages() -> None:
    assert describe_origin(SectorOrigin(5, 42, 0)) == "write #5 to sector 42"
    assert describe(17, payload_sector(5, 42, SEED)) == "sector 17 holds the data of write #5 to sector 42"
    assert describe(17, bytes(512)) == "sector 17 holds zeros"
    assert describe(17, b"\x01" * 512) == "sector 17 holds unidentified data"
    assert (
        describe(17, payload_sector(5, 42, 9), seed=SEED)
        == "sector 17 holds the data of write #5 to sector 42 from run seed 9 (this run's seed is 7)"
    )
    assert describe(17, payload_sector(5, 42, SEED), seed=SEED) == "sector 17 holds the data of write #5 to sector 42"


# --------------------------------------------------------------------------- durability rules


@pytest.mark.parametrize("mode", ["writeback", "writethrough", "directsync"])
def test_write_durability_per_cache_mode(mode: str) -> None:
    disk = ReferenceDisk(MiB, mode)
    pw(disk, 0, 0, 512)
    if mode == "writeback":
        assert origins(disk, 0) == ["durable=initial zeros", "write #0"]
        assert [a.state for a in disk.allowed(0)] == ["durable", "completed"]
    else:
        assert origins(disk, 0) == ["durable=write #0"]
    disk.flush(op_index=1)
    assert origins(disk, 0) == ["durable=write #0"]


@pytest.mark.parametrize("mode", ["writeback", "writethrough", "directsync"])
def test_write_zeroes_durability_per_cache_mode(mode: str) -> None:
    disk = ReferenceDisk(MiB, mode)
    pw(disk, 0, 0, 512)
    disk.flush(op_index=1)
    disk.write_zeroes(0, 512, op_index=2)
    if mode == "writeback":
        assert origins(disk, 0) == ["durable=write #0", "write_zeroes #2 (zeros)"]
    else:
        assert origins(disk, 0) == ["durable=write_zeroes #2 (zeros)"]
    disk.flush(op_index=3)
    assert origins(disk, 0) == ["durable=write_zeroes #2 (zeros)"]
    assert disk.allowed(0)[0].fingerprint == ZERO_FINGERPRINT


@pytest.mark.parametrize("mode", ["writeback", "writethrough", "directsync"])
def test_discard_is_durable_only_after_flush_in_every_mode(mode: str) -> None:
    disk = ReferenceDisk(MiB, mode)
    pw(disk, 0, 0, 1024)
    disk.flush(op_index=1)
    disk.discard(0, 1024, op_index=2)
    assert origins(disk, 0) == ["durable=write #0", "discard #2 (zeros)"]
    assert disk.read(0, 1024) == bytes(1024)
    disk.flush(op_index=3)
    assert origins(disk, 0) == ["durable=discard #2 (zeros)"]


def test_writeback_keeps_every_unflushed_write() -> None:
    disk = ReferenceDisk(MiB, "writeback")
    pw(disk, 0, 0, 512)
    pw(disk, 1, 0, 512)
    pw(disk, 2, 0, 512)
    assert origins(disk, 0) == ["durable=initial zeros", "write #0", "write #1", "write #2"]
    disk.flush(op_index=3)
    assert origins(disk, 0) == ["durable=write #2"]


def test_writethrough_write_supersedes_a_pending_discard() -> None:
    disk = ReferenceDisk(MiB, "writethrough")
    pw(disk, 0, 0, 512)
    disk.discard(0, 512, op_index=1)
    pw(disk, 2, 0, 512)
    assert origins(disk, 0) == ["durable=write #2"]
    # Zeros (the discard's value) are now data loss, and write #0's data is stale.
    verdict = disk.judge_sector(0, bytes(512))
    assert verdict is not None and verdict.kind is Mismatch.STALE_OR_LOST
    verdict = disk.judge_sector(0, payload_sector(0, 0, SEED))
    assert verdict is not None and verdict.kind is Mismatch.STALE_OR_LOST
    # The discard on another sector is still pending.
    disk2 = ReferenceDisk(MiB, "writethrough")
    pw(disk2, 0, 0, 1024)
    disk2.discard(0, 1024, op_index=1)
    pw(disk2, 2, 0, 512)
    assert origins(disk2, 1) == ["durable=write #0", "discard #1 (zeros)"]
    disk2.flush(op_index=3)
    assert origins(disk2, 1) == ["durable=discard #1 (zeros)"]
    assert disk2.live_ops() == {}


def test_flush_covers_only_operations_completed_when_it_began() -> None:
    disk = ReferenceDisk(MiB, "writeback")
    pw(disk, 0, 0, 512, begin_only=True)
    disk.begin_flush(1)
    disk.complete(0)
    disk.complete(1)
    assert origins(disk, 0) == ["durable=initial zeros", "write #0"]
    disk.flush(op_index=2)
    assert origins(disk, 0) == ["durable=write #0"]


# --------------------------------------------------------------------------- in flight


@pytest.mark.parametrize("mode", ["writeback", "writethrough"])
def test_in_flight_write_may_or_may_not_land(mode: str) -> None:
    disk = ReferenceDisk(MiB, mode)
    data = pw(disk, 0, 512, 512, begin_only=True)
    assert [(a.origin, a.state) for a in disk.allowed(1)] == [("durable", "durable"), ("write #0", "in flight")]
    assert disk.live_ops() == {0: "in flight"}
    assert disk.read(512, 512) == data  # reads see a begun operation
    assert disk.judge_sector(1, data) is None
    assert disk.judge_sector(1, bytes(512)) is None
    disk.complete(0)
    if mode == "writethrough":
        assert origins(disk, 1) == ["durable=write #0"]
        assert disk.live_ops() == {}
    else:
        assert [a.state for a in disk.allowed(1)] == ["durable", "completed"]


def test_in_flight_write_stays_allowed_when_a_later_write_becomes_durable() -> None:
    disk = ReferenceDisk(MiB, "writethrough")
    pw(disk, 0, 0, 512, begin_only=True)
    pw(disk, 1, 0, 512)
    assert [(a.origin, a.state) for a in disk.allowed(0)] == [("durable", "durable"), ("write #0", "in flight")]
    assert disk.allowed(0)[0].source == "write #1"


def test_allowed_value_text() -> None:
    disk = ReferenceDisk(MiB, "writeback")
    pw(disk, 0, 0, 512)
    disk.flush(op_index=1)
    pw(disk, 2, 0, 512)
    disk.begin_discard(3, 0, 512)
    fp0 = crc32c(payload_sector(0, 0, SEED))
    fp2 = crc32c(payload_sector(2, 0, SEED))
    assert [str(a) for a in disk.allowed(0)] == [
        f"durable (write #0) [crc32c {fp0:#010x}]",
        f"write #2 [crc32c {fp2:#010x}]",
        f"discard #3 (zeros), in flight [crc32c {ZERO_FINGERPRINT:#010x}]",
    ]


# --------------------------------------------------------------------------- discard and zeroes


def test_discard_zeroes_only_whole_granules() -> None:
    disk = ReferenceDisk(16 * 1024, discard_granularity=4096)
    data = b"\xaa" * 16 * 1024
    disk.write(0, data)
    disk.discard(1000, 9000)  # [1000, 10000): only the granule [4096, 8192) is whole
    assert disk.discarded_sectors(1000, 9000) == (8, 16)
    assert disk.read(0, 16 * 1024) == data[:4096] + bytes(4096) + data[8192:]
    disk.discard(4096 + 512, 4096)  # no whole granule inside
    assert disk.read(0, 16 * 1024) == data[:4096] + bytes(4096) + data[8192:]


def test_discard_partial_last_granule_only_when_request_runs_to_disk_end() -> None:
    size = 10 * 1024  # granules [0,4K) [4K,8K) and the partial [8K,10K)
    disk = ReferenceDisk(size, discard_granularity=4096)
    disk.write(0, b"\xbb" * size)
    assert disk.discarded_sectors(8192, 1536) == (0, 0)  # stops short of the end
    assert disk.discarded_sectors(8704, 1536) == (0, 0)  # runs to the end but starts inside the granule
    assert disk.discarded_sectors(8192, 2048) == (16, 20)
    assert disk.discarded_sectors(5000, 5240) == (16, 20)
    assert disk.discarded_sectors(4096, 6144) == (8, 20)
    disk.discard(8192, 2048)
    assert disk.read(0, size) == b"\xbb" * 8192 + bytes(2048)


def test_discard_granularity_512_zeroes_whole_sectors_only() -> None:
    disk = ReferenceDisk(4096)
    disk.write(0, b"\xcc" * 4096)
    disk.discard(100, 1500)  # [100, 1600): sectors 1 and 2
    assert disk.read(0, 4096) == b"\xcc" * 512 + bytes(1024) + b"\xcc" * 2560


def test_write_zeroes_zeroes_every_byte() -> None:
    disk = ReferenceDisk(4096)
    disk.write(0, b"\xdd" * 4096)
    disk.write_zeroes(100, 1500)
    assert disk.read(0, 4096) == b"\xdd" * 100 + bytes(1500) + b"\xdd" * 2496
    # Partial-sector zeroing makes a patched value, labelled without "(zeros)".
    assert [a.origin for a in disk.allowed(0)][-1] == "write_zeroes #1"
    assert [a.origin for a in disk.allowed(1)][-1] == "write_zeroes #1 (zeros)"


def test_zeros_over_untouched_sectors_cost_nothing() -> None:
    disk = ReferenceDisk(64 * MiB)
    disk.write_zeroes(0, 64 * MiB)
    disk.discard(0, 64 * MiB)
    disk.write(4096, bytes(1024))
    assert disk.touched_sectors() == frozenset()
    disk.write(1000, b"x")
    assert disk.touched_sectors() == {1}
    assert disk.read(999, 3) == b"\0x\0"


def test_read_is_byte_exact_for_unaligned_writes() -> None:
    disk = ReferenceDisk(8192)
    image = bytearray(8192)
    for op, (offset, data) in enumerate([(100, b"a" * 1000), (511, b"bc"), (1023, b"d" * 2050), (7000, b"e" * 1192)]):
        disk.write(offset, data, op_index=op)
        image[offset : offset + len(data)] = data
    assert disk.read(0, 8192) == bytes(image)
    assert disk.read(510, 4) == bytes(image[510:514])
    assert disk.read(8191, 1) == bytes(image[8191:])
    assert disk.read(300, 0) == b""


def test_sub_sector_write_is_judged_as_a_patched_sector() -> None:
    disk = ReferenceDisk(4096)
    pw(disk, 0, 0, 512)
    disk.flush(op_index=1)
    disk.write(100, b"z" * 10, op_index=2)
    patched = bytearray(payload_sector(0, 0, SEED))
    patched[100:110] = b"z" * 10
    assert disk.judge_sector(0, bytes(patched)) is None
    assert disk.judge_sector(0, payload_sector(0, 0, SEED)) is None
    assert disk.read(0, 512) == bytes(patched)


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


# --------------------------------------------------------------------------- errors


def test_request_errors_name_the_op_field_value_and_rule() -> None:
    disk = ReferenceDisk(MiB)
    with pytest.raises(InvalidRequest, match=r"^write #3: offset -512 is negative; guest offsets must be >= 0$"):
        disk.begin_write(3, -512, b"x")
    with pytest.raises(InvalidRequest, match=r"^discard #4: length -1 is negative; lengths must be >= 0$"):
        disk.begin_discard(4, 0, -1)
    with pytest.raises(
        InvalidRequest,
        match=r"^write_zeroes #5: offset 1048000 \+ length 1000 = 1049000 is past the end of the disk "
        r"\(size 1048576\); a request must lie within the disk$",
    ):
        disk.begin_write_zeroes(5, 1048000, 1000)
    with pytest.raises(InvalidRequest, match=r"^read: offset 1048576 \+ length 1 = 1048577 is past the end"):
        disk.read(MiB, 1)
    disk.write(0, b"x", op_index=6)
    with pytest.raises(
        InvalidRequest,
        match=r"^discard #6: op_index 6 was already used by write #6; every guest operation needs its own index$",
    ):
        disk.begin_discard(6, 0, 512)
    with pytest.raises(
        InvalidRequest, match=r"^complete #9: operation #9 was never begun; only an operation in flight can complete$"
    ):
        disk.complete(9)
    with pytest.raises(InvalidRequest, match=r"^complete #6: operation #6 is not in flight \(it has completed already"):
        disk.complete(6)
    with pytest.raises(InvalidRequest, match=r"^flush #-1: op_index -1 is not a non-negative integer$"):
        disk.begin_flush(-1)
    with pytest.raises(InvalidRequest, match=r"^allowed: sector 2048 is outside the disk; sectors run from 0 to 2047$"):
        disk.allowed(2048)
    # A refused request leaves no trace.
    assert disk.live_ops() == {6: "completed"}
    assert disk.next_op_index() == 7


def test_constructor_errors() -> None:
    with pytest.raises(
        InvalidRequest,
        match=r"^ReferenceDisk: size 1000 is not a positive multiple of 512; a virtual disk is a whole number of sectors$",
    ):
        ReferenceDisk(1000)
    with pytest.raises(
        InvalidRequest, match=r"^ReferenceDisk: cache_mode 'none' is not one of writeback, writethrough, directsync$"
    ):
        ReferenceDisk(MiB, "none")
    with pytest.raises(
        InvalidRequest,
        match=r"^ReferenceDisk: discard_granularity 100 is not a positive multiple of 512; discard works on whole sectors",
    ):
        ReferenceDisk(MiB, discard_granularity=100)


def test_payload_sectors_are_stored_compactly() -> None:
    import tracemalloc

    data = make_payload(0, 0, 4 * MiB, SEED)  # 8192 sectors; a full copy would be 4 MiB
    raw = bytes(b ^ 0x5A for b in data[: 64 * 512])  # 64 sectors that are not payload: copied
    tracemalloc.start()
    disk = ReferenceDisk(64 * MiB)
    disk.write(0, data)
    disk.write(32 * MiB, raw)
    disk.flush()
    retained, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(disk.touched_sectors()) == 8192 + 64
    assert retained < 8192 * 300 + 64 * 600, retained
    assert disk.read(0, 4 * MiB) == data
    assert disk.read(32 * MiB, len(raw)) == raw


def test_benchmark_writes_its_report(tmp_path) -> None:
    import json

    from harness.bench import refdisk as bench_refdisk

    figures = bench_refdisk.run(tmp_path)
    saved = json.loads((tmp_path / "bench_refdisk.json").read_text())
    assert saved == json.loads(json.dumps(figures))
    assert saved["workload"]["writes"] == 300
    # The model's own current view is always an allowed crash state.
    assert saved["judge_touched"]["verdicts"] == 0
    assert saved["judge_all"]["verdicts"] == 0
    assert saved["memory"]["touched_sectors"] > 0
