"""The reference model's operation log: which guest operations were begun, which are live, and what a completion makes durable."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from models.blockio import SECTOR, CacheMode
from models.refverdict import InvalidRequest


class GuestOpKind(enum.StrEnum):
    WRITE = "write"
    WRITE_ZEROES = "write_zeroes"
    DISCARD = "discard"
    FLUSH = "flush"


@dataclass(frozen=True, slots=True)
class Op:
    """A live operation: in flight, or completed and not yet durable. Flushes keep what they cover."""

    index: int
    kind: GuestOpKind
    first: int  # sectors [first, stop) may hold its values
    stop: int
    completed: bool = False
    covers: frozenset[int] = frozenset()  # flush only: operations completed when it began


Durable = tuple[set[int] | frozenset[int], int | None, int | None]
"""What a completion makes durable: (operations, first sector, stop sector); a range of None is every sector."""


class OpLog:
    """Every operation index ever begun (`used`) and the live operations (`live`), with the durability rule of each kind."""

    def __init__(self) -> None:
        self.live: dict[int, Op] = {}  # in flight, or completed and not yet durable
        self.used: dict[int, GuestOpKind] = {}  # every operation index ever begun

    def copy(self) -> OpLog:
        new = OpLog()
        new.live = dict(self.live)
        new.used = dict(self.used)
        return new

    def next_index(self) -> int:
        """One more than the largest operation index used so far (0 on a fresh disk)."""
        return max(self.used, default=-1) + 1

    def check_new_index(self, kind: GuestOpKind, op_index: int) -> None:
        if not isinstance(op_index, int) or op_index < 0:
            raise InvalidRequest(f"{kind} #{op_index}: op_index {op_index!r} is not a non-negative integer")
        used = self.used.get(op_index)
        if used is not None:
            raise InvalidRequest(
                f"{kind} #{op_index}: op_index {op_index} was already used by {used} #{op_index}; "
                "every guest operation needs its own index"
            )

    def begin(self, kind: GuestOpKind, op_index: int, offset: int, length: int, size: int, granularity: int) -> None:
        """Check a new operation on [offset, offset+length) of a disk of `size` bytes, and record it as in flight."""
        self.check_new_index(kind, op_index)
        check_range(size, f"{kind} #{op_index}", offset, length)
        self.used[op_index] = kind
        if kind is GuestOpKind.DISCARD:
            first, stop = discarded_sectors(size, granularity, offset, length)
        else:
            first, stop = offset // SECTOR, -(-(offset + length) // SECTOR)
        self.live[op_index] = Op(op_index, kind, first, stop)

    def begin_flush(self, op_index: int) -> None:
        """A flush is issued: it covers every operation completed by now."""
        self.check_new_index(GuestOpKind.FLUSH, op_index)
        covers = frozenset(i for i, op in self.live.items() if op.completed and op.kind is not GuestOpKind.FLUSH)
        self.used[op_index] = GuestOpKind.FLUSH
        self.live[op_index] = Op(op_index, GuestOpKind.FLUSH, 0, 0, covers=covers)

    def complete(self, op_index: int, cache_mode: CacheMode) -> Durable | None:
        """Mark `op_index` returned; what it makes durable under `cache_mode`, if anything."""
        op = self.live.get(op_index)
        if op is None or op.completed:
            if op_index in self.used:
                why = "is not in flight (it has completed already, or a crash ended it)"
            else:
                why = "was never begun"
            raise InvalidRequest(
                f"complete #{op_index}: operation #{op_index} {why}; only an operation in flight can complete"
            )
        if op.kind is GuestOpKind.FLUSH:
            del self.live[op_index]
            return op.covers & self.live.keys(), None, None
        self.live[op_index] = replace(op, completed=True)
        if cache_mode is not CacheMode.WRITEBACK and op.kind is not GuestOpKind.DISCARD:
            return {op_index}, op.first, op.stop
        return None

    def states(self) -> dict[int, str]:
        """Operations not yet durable: index -> "in flight" or "completed"."""
        return {i: ("completed" if op.completed else "in flight") for i, op in sorted(self.live.items())}


def check_range(size: int, what: str, offset: int, length: int) -> None:
    if offset < 0:
        raise InvalidRequest(f"{what}: offset {offset} is negative; guest offsets must be >= 0")
    if length < 0:
        raise InvalidRequest(f"{what}: length {length} is negative; lengths must be >= 0")
    if offset + length > size:
        raise InvalidRequest(
            f"{what}: offset {offset} + length {length} = {offset + length} is past the end of the disk "
            f"(size {size}); a request must lie within the disk"
        )


def check_sector(size: int, what: str, sector: int) -> None:
    if not 0 <= sector < size // SECTOR:
        raise InvalidRequest(
            f"{what}: sector {sector} is outside the disk; sectors run from 0 to {size // SECTOR - 1}"
        )


def discarded_sectors(size: int, granularity: int, offset: int, length: int) -> tuple[int, int]:
    """The sectors [first, stop) a discard of [offset, offset+length) zeroes (maybe none)."""
    g = granularity
    end = offset + length
    lo = -(-offset // g) * g
    hi = end // g * g
    tail = size // g * g
    if end == size and tail < size and offset <= tail:
        hi = size  # the partial last granule, discarded whole (qcow2_co_pdiscard)
    if hi <= lo:
        return (0, 0)
    return (lo // SECTOR, hi // SECTOR)
