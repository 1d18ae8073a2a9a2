"""Self-identifying guest payloads: every 512-byte sector a guest write covers names the write, the sector and the run that made it.

Sector image layout (one per guest sector, always the same 512 bytes for the same
``(op_index, sector, seed)``)::

    bytes   0-7    magic b"QCRASHPL"
    bytes   8-15   op_index   (big-endian u64): which guest operation wrote it
    bytes  16-23   sector     (big-endian u64): the absolute guest sector it was written to
    bytes  24-31   seed       (big-endian u64): the run's seed
    bytes  32-511  fill: BLAKE2b-512 of bytes 0-31, repeated (7.5 times)

The fill depends on every header field, so `identify_sector` can check the whole sector
and refuses one with even a single flipped bit: a corrupted sector is reported as
unidentified rather than pinned on the wrong write.
"""

from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple

from models.blockio import SECTOR

MAGIC = b"QCRASHPL"
HEADER = struct.Struct(">8sQQQ")  # magic, op_index, sector, seed
HEADER_SIZE = HEADER.size
FILL_SIZE = SECTOR - HEADER_SIZE
_U64_MAX = (1 << 64) - 1
_ZERO_SECTOR = bytes(SECTOR)

assert HEADER_SIZE == 32


class SectorOrigin(NamedTuple):
    """Who made a payload sector: the guest operation, the guest sector it was written to, and the run seed."""

    op_index: int
    sector: int
    seed: int


class PayloadError(ValueError):
    """A payload request with a field out of range; the message names the field, the value and the rule."""


def _check_u64(func: str, field: str, value: int) -> None:
    if not 0 <= value <= _U64_MAX:
        raise PayloadError(f"{func}: {field} {value} is out of range; it must fit an unsigned 64-bit integer (0..2**64-1)")


def payload_sector(op_index: int, sector: int, seed: int) -> bytes:
    """The 512-byte image of guest sector `sector` as written by operation `op_index` in run `seed`."""
    header = HEADER.pack(MAGIC, op_index, sector, seed)
    digest = hashlib.blake2b(header, digest_size=64).digest()
    return header + (digest * 8)[:FILL_SIZE]


def make_payload(op_index: int, offset: int, length: int, seed: int) -> bytes:
    """The bytes a guest write of `length` bytes at guest byte `offset` carries.

    Each covered sector contributes the matching slice of its sector image, so an
    unaligned write still puts at every byte exactly what an aligned write of the same
    operation would have put there.
    """
    _check_u64("make_payload", "op_index", op_index)
    _check_u64("make_payload", "seed", seed)
    if offset < 0:
        raise PayloadError(f"make_payload: offset {offset} is negative; guest offsets must be >= 0")
    if length < 0:
        raise PayloadError(f"make_payload: length {length} is negative; lengths must be >= 0")
    if length == 0:
        return b""
    first = offset // SECTOR
    last = (offset + length - 1) // SECTOR
    _check_u64("make_payload", "last sector", last)
    pack = HEADER.pack
    blake2b = hashlib.blake2b
    parts = []
    for sector in range(first, last + 1):
        header = pack(MAGIC, op_index, sector, seed)
        parts.append(header)
        parts.append((blake2b(header, digest_size=64).digest() * 8)[:FILL_SIZE])
    start = offset - first * SECTOR
    whole = b"".join(parts)
    if start == 0 and length == len(whole):
        return whole
    return whole[start : start + length]


def identify_sector(data: bytes | bytearray | memoryview) -> SectorOrigin | None:
    """Who wrote these 512 bytes, or None if they are not an intact payload sector."""
    if len(data) != SECTOR:
        raise PayloadError(f"identify_sector: got {len(data)} bytes; a sector is exactly {SECTOR} bytes")
    if bytes(data[: len(MAGIC)]) != MAGIC:
        return None
    _, op_index, sector, seed = HEADER.unpack_from(data)
    if payload_sector(op_index, sector, seed) != data:
        return None
    return SectorOrigin(op_index, sector, seed)


def describe_origin(origin: SectorOrigin) -> str:
    """'write #5 to sector 42'."""
    return f"write #{origin.op_index} to sector {origin.sector}"


def describe(sector: int, data: bytes | bytearray | memoryview, *, seed: int | None = None) -> str:
    """One sentence saying what guest sector `sector` holds, for findings.

    'sector 17 holds the data of write #5 to sector 42', 'sector 17 holds zeros' or
    'sector 17 holds unidentified data'. When `seed` (this run's seed) is given and the
    payload carries another seed, the sentence says so: the data came from another run.
    """
    origin = identify_sector(data)
    if origin is not None:
        text = f"sector {sector} holds the data of {describe_origin(origin)}"
        if seed is not None and origin.seed != seed:
            text += f" from run seed {origin.seed} (this run's seed is {seed})"
        return text
    if bytes(data) == _ZERO_SECTOR:
        return f"sector {sector} holds zeros"
    return f"sector {sector} holds unidentified data"
