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
import itertools
import random
from typing import Protocol, Sequence, TypeVar

from harness import profiles
from harness.config import Config, draw_config
from harness.crashstates import Policy
from harness.ops import Check, Crash, Discard, Flush, Op, Read, Reopen, Repair, Write, WriteZeroes
from models.blockio import SECTOR, CacheMode

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

# How often a range op goes back over data written earlier in the sequence.
REUSE = {"write": 0.3, "write_zeroes": 0.6, "discard": 0.7, "read": 0.6}

# subsets twice: it is the policy with the most distinct states. Garbage (harsh mode) is never drawn.
CRASH_POLICY_MIX = (Policy.DROP_UNSYNCED, Policy.PREFIX, Policy.SUBSETS, Policy.SUBSETS, Policy.TORN, Policy.TRUNCATE)
REOPEN_CACHE_MIX = (None,) + tuple(m.value for m in CacheMode)


def op_kind(src: Source) -> str:
    r = src.random()
    return next((kind for (kind, _), t in zip(OP_MIX, _THRESHOLDS) if r < t), OP_MIX[-1][0])


# --------------------------------------------------------------------------- ranges


def interesting_offset(src: Source, config: Config) -> int:
    """Offsets weighted toward cluster, L2-table and refcount-block boundaries, where metadata changes."""
    cs = config.cluster_size
    size = config.virtual_size
    l2_span = cs * (cs // 8)
    pick = src.random()
    if pick < 0.35:
        base = src.randrange(0, size, cs)
    elif pick < 0.5 and l2_span < size:
        base = src.randrange(0, size, l2_span)
        base = max(0, base + src.choice((-cs, 0, 0, cs)))
    elif pick < 0.65:
        base = src.randrange(0, min(size, 16 * cs), cs)  # a hot region, so overwrites and reuse happen
    else:
        base = src.randrange(0, size, SECTOR)
    return min(base, size - SECTOR)


def random_range(src: Source, config: Config) -> tuple[int, int]:
    offset = interesting_offset(src, config)
    cs = config.cluster_size
    choice = src.random()
    if choice < 0.4:
        length = cs
    elif choice < 0.6:
        length = SECTOR * src.randint(1, 8)
    elif choice < 0.8:
        length = cs * src.randint(1, 3)
    elif choice < 0.97:
        length = SECTOR * src.randint(1, max(1, 4 * cs // SECTOR))
    else:
        # Rarely a big write, so small clusters reach new refcount blocks and refcount-table growth.
        length = SECTOR * src.randint(256, 4096)
    length = min(length, config.virtual_size - offset)
    return offset, max(SECTOR, length // SECTOR * SECTOR)


def near(src: Source, config: Config, recent: list[tuple[int, int]]) -> tuple[int, int]:
    """A range over data written earlier, widened to whole clusters (so discards and zero writes bite)."""
    cs = config.cluster_size
    off, n = src.choice(recent)
    start = off - off % cs
    end = min(config.virtual_size, -(-(off + n) // cs) * cs)
    if src.random() < 0.3:
        return off, n
    return start, max(SECTOR, end - start)


def fill_length(src: Source, config: Config) -> int | None:
    """A write long enough to need new refcount blocks, or to grow the refcount table, when the disk allows."""
    cs = config.cluster_size
    rbe = cs * 8 // config.refcount_bits
    block_span = rbe * cs  # host bytes one refcount block covers
    table_span = (cs // 8) * block_span  # host bytes a one-cluster refcount table covers
    limit = min(config.virtual_size, 4 << 20)
    choices = [n for n in (block_span + block_span // 2, table_span + 4 * cs, table_span + 4 * cs) if n <= limit]
    if not choices:
        return None
    return src.choice(choices) // SECTOR * SECTOR


def guest_range(src: Source, config: Config, recent: list[tuple[int, int]], reuse: float) -> tuple[int, int]:
    if recent and src.random() < reuse:
        return near(src, config, recent)
    return random_range(src, config)


# --------------------------------------------------------------------------- operations


def draw_op(kind: str, src: Source, config: Config, recent: list[tuple[int, int]]) -> Op:
    """One operation of `kind` (a row of OP_MIX); a drawn write is appended to `recent`."""
    if kind in REUSE:
        off, n = guest_range(src, config, recent, REUSE[kind])
        if kind == "write":
            recent.append((off, n))
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


def random_op(src: Source, config: Config, *, allow_crash: bool = True,
              recent: list[tuple[int, int]] | None = None) -> Op:
    kind = op_kind(src)
    if kind == "crash" and not allow_crash:
        return Flush()
    return draw_op(kind, src, config, recent if recent is not None else [])


def random_ops(src: Source, config: Config, n: int) -> list[Op]:
    recent: list[tuple[int, int]] = []
    ops = [random_op(src, config, recent=recent) for _ in range(n)]
    if src.random() < 0.35:
        # Sometimes one long write, so allocation reaches new refcount blocks and table growth.
        length = fill_length(src, config)
        if length:
            ops.insert(src.randrange(len(ops) + 1), Write(0, length, src.randrange(1 << 16)))
    return ops


def generate(seed: int, config_overrides: dict[str, str], profile: str) -> tuple[Config, list[Op]]:
    """Example `seed` of `qcrash fuzz` under `profile`: its configuration (pinned axes applied) and operations."""
    rng = random.Random(seed)
    config = draw_config(rng)
    if config_overrides:
        config = config.pinned(config_overrides)
    lo, hi = profiles.get(profile).ops
    return config, random_ops(rng, config, rng.randint(lo, hi))
