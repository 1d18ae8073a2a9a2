"""The one generator of runs: a configuration and a sequence of operations from a source of choices (a seeded rng or Hypothesis).

Every choice goes through a `Source`: `random.Random` is one (`qcrash fuzz`, by seed), and
`Choices` is another, replaying a list of small integers that the Hypothesis state machine
draws as a rule argument. So both front ends share one generator, and Hypothesis prints
each step as a runnable call (`state.write(draws=[3, 0, 17])`) and shrinks the integers
toward zero, that is toward the first entry of every table below.

Hazard: `qcrash fuzz` is deterministic by seed, and recorded digests
(`python -m harness.bench.behaviour`) pin the exact sequence of rng calls. Reordering a
draw here, or drawing one more value, changes every example after it.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import random
from typing import Protocol, Sequence, TypeVar

from harness import profiles
from harness.config import Config, draw_config
from harness.crashstates import Policy
from harness import ranges
from harness.ranges import Shape, Written, near_written, never_written, structured_range
from harness.ops import (Check, Crash, Discard, Flush, Op, Read, Reopen, Repair, SnapshotApply, SnapshotCreate,
                         SnapshotDelete, Write, WriteZeroes)
from models.blockio import CacheMode

T = TypeVar("T")


class Source(Protocol):
    """The part of `random.Random` the generator uses."""

    def random(self) -> float: ...
    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int: ...
    def randint(self, a: int, b: int) -> int: ...
    def choice(self, seq: Sequence[T]) -> T: ...
    def choices(self, population: Sequence[T], weights: Sequence[float] | None = None, *, k: int = 1) -> list[T]: ...


DRAW_MAX = (1 << 16) - 1
"""Each of `Choices`' integers is in 0..DRAW_MAX."""


class Choices:
    """A `Source` replaying given integers (0 when they run out): 0 always means the first or smallest choice."""

    def __init__(self, draws: Sequence[int]) -> None:
        self._next = itertools.chain(draws, itertools.repeat(0)).__next__

    def _int(self) -> int:
        return self._next() % (DRAW_MAX + 1)

    def random(self) -> float:
        return self._int() / (DRAW_MAX + 1)

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        r = range(start) if stop is None else range(start, stop, step)
        return r[self._int() % len(r)]

    def randint(self, a: int, b: int) -> int:
        return self.randrange(a, b + 1)

    def choice(self, seq: Sequence[T]) -> T:
        return seq[self._int() % len(seq)]

    def choices(self, population: Sequence[T], weights: Sequence[float] | None = None, *, k: int = 1) -> list[T]:
        cum = list(itertools.accumulate(weights if weights is not None else [1] * len(population)))
        return [population[min(bisect.bisect(cum, self.random() * cum[-1]), len(population) - 1)] for _ in range(k)]


# --------------------------------------------------------------------------- the op mix

# Percent of operations of each kind. The generator walks the table with one uniform draw
# (cumulative thresholds), so the order of rows is part of the seeded behaviour.
OP_MIX: tuple[tuple[str, int], ...] = (
    ("write", 40),
    ("write_zeroes", 8),
    ("discard", 10),
    ("flush", 10),
    ("read", 6),
    ("reopen", 6),
    ("check", 3),
    ("repair", 2),
    ("crash", 15),  # a Flush instead when crashes are not allowed
)
assert sum(w for _, w in OP_MIX) == 100
# Thresholds as n/100: the correctly rounded double of each percentage, equal to the literal 0.48 etc.
_THRESHOLDS = tuple(c / 100 for c in itertools.accumulate(w for _, w in OP_MIX))

# Where a range op aims: (share over data written earlier, share over never-written clusters);
# the rest are structure-aware ranges (harness.ranges.RANGE_MIX).
AIM = {"write": (0.3, 0.0), "write_zeroes": (0.5, 0.15), "discard": (0.6, 0.15), "read": (0.5, 0.2)}

# subsets twice: it is the policy with the most distinct states. Garbage (harsh mode) is never drawn.
CRASH_POLICY_MIX = (Policy.DROP_UNSYNCED, Policy.PREFIX, Policy.SUBSETS, Policy.SUBSETS, Policy.TORN, Policy.TRUNCATE)
REOPEN_CACHE_MIX = (None,) + tuple(m.value for m in CacheMode)


def op_kind(src: Source) -> str:
    r = src.random()
    return next((kind for (kind, _), t in zip(OP_MIX, _THRESHOLDS) if r < t), OP_MIX[-1][0])


# --------------------------------------------------------------------------- operations


def guest_range(src: Source, kind: str, shape: Shape, written: Written) -> tuple[int, int]:
    near, never = AIM[kind]
    r = src.random()
    if written.ranges and r < near:
        return near_written(src, shape, written)
    if r >= 1 - never:
        return never_written(src, shape, written)
    return structured_range(src, shape, written)


def draw_op(kind: str, src: Source, config: Config, written: Written) -> Op:
    """One operation of `kind` (a row of OP_MIX); a drawn write is added to `written`."""
    if kind in AIM:
        shape = Shape.of(config)
        off, n = guest_range(src, kind, shape, written)
        if kind == "write":
            written.add(shape, off, n)
            return Write(off, n, src.randrange(1 << 16))
        return {"write_zeroes": WriteZeroes, "discard": Discard, "read": Read}[kind](off, n)
    if kind == "flush":
        return Flush()
    if kind == "reopen":
        lazy = src.choice((None, True, False)) if config.version == 3 else None
        return Reopen(lazy, src.choice(REOPEN_CACHE_MIX))
    if kind == "check":
        return Check()
    if kind == "repair":
        return Repair(src.choice(("leaks", "all")))
    if kind == "crash":
        return Crash(src.randrange(-1, 64), src.choice(CRASH_POLICY_MIX), src.randrange(64))
    raise ValueError(f"draw_op: kind {kind!r} is not a row of OP_MIX")


def random_op(src: Source, config: Config, *, allow_crash: bool = True, written: Written | None = None) -> Op:
    kind = op_kind(src)
    if kind == "crash" and not allow_crash:
        return Flush()
    return draw_op(kind, src, config, written if written is not None else Written())


# Ops after a refcount-table growth fill, at most. The fill leaves a host file of 2 MiB and more
# (thousands of clusters), which makes every crash state of every later op many times dearer to
# judge (above all a snapshot op or a lazy-refcounts rebuild): one such example ran for minutes
# with the fill early in 17 ops. Near the end, an edge example costs about one long op more.
GROWTH_TAIL = 2


def random_ops(src: Source, config: Config, n: int) -> list[Op]:
    written = Written()
    ops = [random_op(src, config, written=written) for _ in range(n)]
    shape = Shape.of(config)
    growth = ranges.growth_in_reach(shape)
    grow: Write | None = None
    if src.random() < 0.3 or growth:
        # One long write from the disk's start, so allocation reaches a new refcount block or
        # refcount-table growth wherever in the sequence it lands: sometimes, and always when this
        # geometry lets one write grow the table (few configurations do, and only a fill gets there).
        off, length = ranges.fill(src, shape, Written(), growth=growth)
        if growth:
            grow = Write(off, length, src.randrange(1 << 16))
        else:  # (the slot is drawn before the payload seed, as always: the seeded digests pin that order)
            ops.insert(src.randrange(len(ops) + 1), Write(off, length, src.randrange(1 << 16)))
    if isinstance(src, random.Random):  # (Choices replays draws; the state machine has its own snapshot rule)
        _insert_snapshot_ops(src, ops)
    if grow is not None:
        ops.insert(src.randrange(max(0, len(ops) - GROWTH_TAIL), len(ops) + 1), grow)
    return ops


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


def edge_geometry(config: Config) -> Config:
    """`config` moved to the geometry whose refcount edges come soonest: 512 B clusters and the widest
    refcounts the version allows, on a disk big enough for one write to grow the refcount table.

    v3 with 64-bit refcounts: a refcount block counts 64 clusters (32 KiB of host file) and the
    one-cluster refcount table 4096 (2 MiB), so a 2 MiB disk holds the fill that grows it. v2 is
    held to 16-bit refcounts: its table covers 8 MiB, past the fill limit (ranges.FILL_LIMIT);
    its edge examples reach new refcount blocks (every 256 KiB) but not table growth.
    """
    bits = 64 if config.version == 3 else 16
    return dataclasses.replace(config, cluster_size=512, refcount_bits=bits,
                               virtual_size=max(config.virtual_size, 2 << 20))


EDGE_AXES = frozenset({"version", "cluster_size", "refcount_bits", "virtual_size"})


def _edge_example(seed: int, share: float) -> bool:
    """Whether example `seed` is an edge example; its own stream, so every other draw stays as it was."""
    return share > 0 and random.Random(f"qcrash-edge:{seed}").random() < share


def generate(seed: int, config_overrides: dict[str, str], profile: str) -> tuple[Config, list[Op]]:
    """Example `seed` of `qcrash fuzz` under `profile`: its configuration (a share moved to the edge
    geometry, then pinned axes applied) and operations."""
    rng = random.Random(seed)
    config = draw_config(rng)
    # A geometry axis pinned by the user is what they want to test: edge examples then keep the drawn one.
    if _edge_example(seed, profiles.get(profile).edge_examples) and not EDGE_AXES & config_overrides.keys():
        config = edge_geometry(config)
    if config_overrides:
        config = config.pinned(config_overrides)
    lo, hi = profiles.get(profile).ops
    return config, random_ops(rng, config, rng.randint(lo, hi))
