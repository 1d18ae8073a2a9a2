"""Helpers shared by the reference-disk unit tests: a reader over image bytes, the origins a sector allows, and a payload write."""

from __future__ import annotations

from models.payload import make_payload
from models.refdisk import ReferenceDisk

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
