"""Workload operations as small serialisable values whose repr is valid Python, and their random generation."""

from __future__ import annotations

import dataclasses
import random
from typing import Union

from harness.config import Config

SECTOR = 512


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
    policy: str = "subsets"
    state: int = 0
    crash_id: str | None = None  # an exact crash-state id (as printed in findings); overrides the three above


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
GUEST_OPS = (Write, WriteZeroes, Discard, Flush)


class OpError(ValueError):
    """An operation value breaks a rule; the message names the op, the field, the value and the rule."""


def op_to_dict(op: Op) -> dict:
    return {"op": type(op).__name__, **dataclasses.asdict(op)}


def op_from_dict(data: dict, where: str = "op") -> Op:
    if not isinstance(data, dict) or "op" not in data:
        raise OpError(f"{where}: must be an object with an 'op' field naming one of {', '.join(OP_TYPES)}")
    name = data["op"]
    cls = OP_TYPES.get(name)
    if cls is None:
        raise OpError(f"{where}.op = {name!r}: unknown operation; known: {', '.join(OP_TYPES)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key == "op":
            continue
        if key not in fields:
            raise OpError(f"{where}.{key}: not a field of {name} (fields: {', '.join(fields) or 'none'})")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise OpError(f"{where}: {name}: {exc}") from None


def validate_op(op: Op, config: Config, where: str = "op") -> None:
    """Guest ranges must be sector-aligned and inside the disk: crash judging is exact per 512-byte sector."""
    if isinstance(op, (Write, WriteZeroes, Discard, Read)):
        for field in ("offset", "length"):
            value = getattr(op, field)
            if not isinstance(value, int) or value < 0 or value % SECTOR:
                raise OpError(f"{where}: {type(op).__name__}.{field} = {value!r}: must be a non-negative multiple of 512")
        if op.length == 0 or op.offset + op.length > config.virtual_size:
            raise OpError(f"{where}: {type(op).__name__} offset={op.offset} length={op.length}: "
                          f"must be non-empty and end within the virtual size {config.virtual_size}")
    if isinstance(op, Crash) and op.policy not in ("drop-unsynced", "prefix", "subsets", "torn", "truncate", "garbage"):
        raise OpError(f"{where}: Crash.policy = {op.policy!r}: unknown crash policy")
    if isinstance(op, SNAPSHOT_OPS) and (not isinstance(op.name, str) or not op.name or op.name.isdigit()
                                         or len(op.name.encode()) > 0xFFFF):
        raise OpError(f"{where}: {type(op).__name__}.name = {op.name!r}: must be a non-empty, non-numeric string "
                      "(numeric names would collide with snapshot ids) of at most 65535 bytes")
    if isinstance(op, Repair) and op.mode not in ("leaks", "all"):
        raise OpError(f"{where}: Repair.mode = {op.mode!r}: must be 'leaks' or 'all'")


def interesting_offset(rng: random.Random, config: Config) -> int:
    """Offsets weighted toward cluster, L2-table and refcount-block boundaries, where metadata changes."""
    cs = config.cluster_size
    size = config.virtual_size
    l2_span = cs * (cs // 8)
    pick = rng.random()
    if pick < 0.35:
        base = rng.randrange(0, size, cs)
    elif pick < 0.5 and l2_span < size:
        base = rng.randrange(0, size, l2_span)
        base = max(0, base + rng.choice((-cs, 0, 0, cs)))
    elif pick < 0.65:
        base = rng.randrange(0, min(size, 16 * cs), cs)  # a hot region, so overwrites and reuse happen
    else:
        base = rng.randrange(0, size, SECTOR)
    return min(base, size - SECTOR)


def random_range(rng: random.Random, config: Config) -> tuple[int, int]:
    offset = interesting_offset(rng, config)
    cs = config.cluster_size
    choice = rng.random()
    if choice < 0.4:
        length = cs
    elif choice < 0.6:
        length = SECTOR * rng.randint(1, 8)
    elif choice < 0.8:
        length = cs * rng.randint(1, 3)
    elif choice < 0.97:
        length = SECTOR * rng.randint(1, max(1, 4 * cs // SECTOR))
    else:
        # Rarely a big write, so small clusters reach new refcount blocks and refcount-table growth.
        length = SECTOR * rng.randint(256, 4096)
    length = min(length, config.virtual_size - offset)
    return offset, max(SECTOR, length // SECTOR * SECTOR)


def _near(rng: random.Random, config: Config, recent: list[tuple[int, int]]) -> tuple[int, int]:
    """A range over data written earlier, widened to whole clusters (so discards and zero writes bite)."""
    cs = config.cluster_size
    off, n = rng.choice(recent)
    start = off - off % cs
    end = min(config.virtual_size, -(-(off + n) // cs) * cs)
    if rng.random() < 0.3:
        return off, n
    return start, max(SECTOR, end - start)


def _fill_length(rng: random.Random, config: Config) -> int | None:
    """A write long enough to need new refcount blocks, or to grow the refcount table, when the disk allows."""
    cs = config.cluster_size
    rbe = cs * 8 // config.refcount_bits
    block_span = rbe * cs  # host bytes one refcount block covers
    table_span = (cs // 8) * block_span  # host bytes a one-cluster refcount table covers
    limit = min(config.virtual_size, 4 << 20)
    choices = [n for n in (block_span + block_span // 2, table_span + 4 * cs, table_span + 4 * cs) if n <= limit]
    if not choices:
        return None
    return rng.choice(choices) // SECTOR * SECTOR


def random_snapshot_op(rng: random.Random, names: list[str]) -> Op:
    """Create a new snapshot, or apply or delete one created earlier in the sequence (`names`, updated).

    A crash may undo a create, so apply/delete can still name a snapshot the image lacks: the
    runner then skips it on both sides."""
    r = rng.random()
    if not names or r < 0.35:
        names.append(f"s{len(names)}")
        return SnapshotCreate(names[-1])
    name = rng.choice(names)
    if r < 0.6:
        return SnapshotApply(name)
    names.remove(name)
    return SnapshotDelete(name)


def random_op(rng: random.Random, config: Config, *, allow_crash: bool = True,
              recent: list[tuple[int, int]] | None = None) -> Op:
    recent = recent if recent is not None else []

    def pick_range(reuse: float) -> tuple[int, int]:
        if recent and rng.random() < reuse:
            return _near(rng, config, recent)
        return random_range(rng, config)

    r = rng.random()
    if r < 0.40:
        off, n = pick_range(0.3)
        recent.append((off, n))
        return Write(off, n, rng.randrange(1 << 16))
    if r < 0.48:
        off, n = pick_range(0.6)
        return WriteZeroes(off, n)
    if r < 0.58:
        off, n = pick_range(0.7)
        return Discard(off, n)
    if r < 0.68:
        return Flush()
    if r < 0.74:
        off, n = pick_range(0.6)
        return Read(off, n)
    if r < 0.80:
        lazy = rng.choice((None, True, False)) if config.version == 3 else None
        return Reopen(lazy, rng.choice((None, "writeback", "writethrough", "directsync")))
    if r < 0.83:
        return Check()
    if r < 0.85:
        return Repair(rng.choice(("leaks", "all")))
    if allow_crash:
        return Crash(rng.randrange(-1, 64), rng.choice(("drop-unsynced", "prefix", "subsets", "subsets", "torn", "truncate")),
                     rng.randrange(64))
    return Flush()


def random_ops(rng: random.Random, config: Config, n: int) -> list[Op]:
    recent: list[tuple[int, int]] = []
    ops = [random_op(rng, config, recent=recent) for _ in range(n)]
    if rng.random() < 0.35:
        # Sometimes one long write, so allocation reaches new refcount blocks and table growth.
        length = _fill_length(rng, config)
        if length:
            ops.insert(rng.randrange(len(ops) + 1), Write(0, length, rng.randrange(1 << 16)))
    _insert_snapshot_ops(rng, ops)
    return ops


def _insert_snapshot_ops(rng: random.Random, ops: list[Op]) -> None:
    """One sequence in three gets 2 to 4 snapshot operations inserted among its ops.

    They come from their own stream, seeded from the state of `rng` without drawing from it:
    every other operation of every sequence stays exactly what it was without snapshots."""
    state = rng.getstate()[1]
    snap_rng = random.Random(f"qcrash-snapshots:{state[-1]}:{state[:8]}")
    if snap_rng.random() >= 1 / 3:
        return
    names: list[str] = []
    slots = sorted(snap_rng.randrange(len(ops) + 1) for _ in range(snap_rng.randint(2, 4)))
    for shift, slot in enumerate(slots):
        ops.insert(slot + shift, random_snapshot_op(snap_rng, names))
