"""Workload operations as small serialisable values whose repr is valid Python (generation is harness.generate)."""

from __future__ import annotations

import dataclasses
from typing import Union

from harness import serial
from harness.config import Config
from harness.crashstates import Policy
from harness.errors import QcrashError
from models.blockio import SECTOR



@dataclasses.dataclass(frozen=True, slots=True)
class Write:
    offset: int
    length: int
    seed: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class WriteZeroes:
    offset: int
    length: int


@dataclasses.dataclass(frozen=True, slots=True)
class Discard:
    offset: int
    length: int


@dataclasses.dataclass(frozen=True, slots=True)
class Read:
    offset: int
    length: int


@dataclasses.dataclass(frozen=True, slots=True)
class Flush:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Reopen:
    """Clean close and open again, optionally switching lazy refcounts and the cache mode."""

    lazy_refcounts: bool | None = None
    cache_mode: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Crash:
    """Crash at host-op `point` of the current log under `policy`, taking enumerated state `state`.

    `point` and `state` are reduced modulo what exists, so any integers are valid (and shrink well).
    """

    point: int = -1  # negative counts back from the end: -1 = after the last host op
    policy: Policy = Policy.SUBSETS  # a policy's name is accepted too; it serialises as the name
    state: int = 0
    crash_id: str | None = None  # an exact crash-state id (as printed in findings); overrides the three above

    def __post_init__(self) -> None:
        if not isinstance(self.policy, Policy):
            try:
                object.__setattr__(self, "policy", Policy(self.policy))
            except ValueError:
                raise OpError(f"Crash.policy = {self.policy!r}: unknown crash policy; "
                              f"known: {', '.join(Policy)}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Repair:
    mode: str = "all"


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotCreate:
    """qemu-img snapshot -c NAME: take an internal snapshot of the guest view."""

    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotApply:
    """qemu-img snapshot -a NAME: revert the guest view to a snapshot (a no-op if none has the name)."""

    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotDelete:
    """qemu-img snapshot -d NAME: delete a snapshot (a no-op if none has the name)."""

    name: str


SNAPSHOT_OPS = (SnapshotCreate, SnapshotApply, SnapshotDelete)
Op = Union[Write, WriteZeroes, Discard, Read, Flush, Reopen, Crash, Check, Repair, SnapshotCreate, SnapshotApply,
           SnapshotDelete]
OP_TYPES: dict[str, type] = {cls.__name__: cls for cls in (Write, WriteZeroes, Discard, Read, Flush, Reopen, Crash, Check,
                                                           Repair, *SNAPSHOT_OPS)}
GUEST_RANGE_OPS = (Write, WriteZeroes, Discard, Read)
"""The operations on a guest range (offset, length)."""


class OpError(QcrashError):
    """An operation value breaks a rule; the message names the op, the field, the value and the rule."""


def op_to_dict(op: Op) -> dict:
    return serial.to_data(op, Op)  # type: ignore[return-value]


def op_from_dict(data: dict, where: str = "op") -> Op:
    try:
        return serial.from_data(Op, data, where=where)
    except serial.SerialError as exc:
        raise OpError(str(exc)) from None


def validate_op(op: Op, config: Config, where: str = "op") -> None:
    """Guest ranges must be sector-aligned and inside the disk: crash judging is exact per 512-byte sector."""
    if isinstance(op, GUEST_RANGE_OPS):
        for field in ("offset", "length"):
            value = getattr(op, field)
            if not isinstance(value, int) or value < 0 or value % SECTOR:
                raise OpError(f"{where}: {type(op).__name__}.{field} = {value!r}: must be a non-negative multiple of 512")
        if op.length == 0 or op.offset + op.length > config.virtual_size:
            raise OpError(f"{where}: {type(op).__name__} offset={op.offset} length={op.length}: "
                          f"must be non-empty and end within the virtual size {config.virtual_size}")
    if isinstance(op, SNAPSHOT_OPS) and (not isinstance(op.name, str) or not op.name or op.name.isdigit()
                                         or len(op.name.encode()) > 0xFFFF):
        raise OpError(f"{where}: {type(op).__name__}.name = {op.name!r}: must be a non-empty, non-numeric string "
                      "(numeric names would collide with snapshot ids) of at most 65535 bytes")
    if isinstance(op, Repair) and op.mode not in ("leaks", "all"):
        raise OpError(f"{where}: Repair.mode = {op.mode!r}: must be 'leaks' or 'all'")
