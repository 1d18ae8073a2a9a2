"""Unit tests for models.refdisk: the durability rules per cache mode, in-flight operations, discard alignment, storage and errors."""

from __future__ import annotations

import pytest

from models.payload import make_payload, payload_sector
from models.refdisk import ZERO_FINGERPRINT, InvalidRequest, Mismatch, ReferenceDisk, crc32c
from tests.unit._refdisk_tools import SEED, MiB, origins, pw

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


def test_the_fingerprint_is_crcmods_crc32c() -> None:
    # The model's fast CRC-32C (the crc32c package) against crcmod's table-driven one, on
    # sector-sized and odd-sized buffers of every kind the model hands it.
    import random

    import crcmod.predefined

    reference = crcmod.predefined.mkCrcFun("crc-32c")
    rng = random.Random(32)
    for size in (0, 1, 7, 511, 512, 513, 4096):
        data = rng.randbytes(size)
        for buf in (data, bytearray(data), memoryview(data)):
            assert crc32c(buf) == reference(data), size
    assert ZERO_FINGERPRINT == reference(bytes(512))
