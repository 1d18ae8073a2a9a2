"""Unit tests for models.payload: payloads are deterministic and self-identifying, and bad requests get named errors."""

from __future__ import annotations

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
from tests.unit._refdisk_tools import SEED

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


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_values_keep_an_intact_payload_as_its_key_and_anything_else_as_its_bytes(kind) -> None:
    """The model's value of a sector: an intact payload of that very sector is kept as (op, seed) and rebuilt; a
    payload of another sector, a damaged one, zeros and foreign bytes keep what they are; each reads back as given."""
    from models.refvalues import ZERO_SECTOR, Values, crc32c

    values = Values(5, "write #5", "write #5 (zeros)")
    data = make_payload(5, 512 * 10, 512 * 3, 77)
    sector11 = data[512:1024]
    damaged = bytearray(sector11)
    damaged[300] ^= 1
    cases = {
        "intact": (11, sector11, (5, 77)),
        "another sector's": (12, sector11, bytes(sector11)),
        "damaged": (11, bytes(damaged), bytes(damaged)),
        "zeros": (11, ZERO_SECTOR, None),
        "foreign": (11, bytes(range(256)) * 2, bytes(range(256)) * 2),
        "a header only": (11, sector11[:40] + bytes(472), sector11[:40] + bytes(472)),
    }
    for name, (sector, chunk, src) in cases.items():
        val = values.of(sector, kind(bytearray(chunk)) if kind is not bytes else bytes(chunk))
        assert val.src == src and type(val.src) is type(src), name
        assert val.data(sector) == bytes(chunk) and val.fp == crc32c(bytes(chunk)), name
