"""The policies' crash spaces at a point: exact counts, exhaustive enumeration and seeded sampling."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence

from harness.crashstates.state import DEFAULT_POLICIES, CrashState, Policy, Tears
from harness.faultfile import HostOp, HostOpKind, WriteLog, sector_count
from models.blockio import SECTOR

def _check_args(log: WriteLog, point: int, policy: Policy | str, k: int, samples: int = 0) -> Policy:
    log.check_point(point)
    for name, value in (("k", k), ("samples", samples)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}: must be a non-negative int")
    try:
        return Policy(policy)
    except ValueError:
        raise ValueError(f"policy {policy!r} is unknown: expected one of {', '.join(Policy)}") from None


def _tearable(unsynced: Iterable[HostOp]) -> list[tuple[HostOp, int]]:
    """The unsynced writes with at least two sectors, with their sector counts."""
    out = []
    for op in unsynced:
        if op.kind is HostOpKind.WRITE:
            m = sector_count(op.offset, len(op.data))
            if m >= 2:
                out.append((op, m))
    return out


def truncate_candidates(log: WriteLog, point: int) -> list[int]:
    """The ``truncate`` policy's cut sizes at `point`, ascending (see the package docstring)."""
    durable = log.durable_size(point)
    current = log.size_at(point)
    candidates = {durable}
    before = durable
    for op in log.unsynced(point):
        after = op.size_after
        candidates.add(after)
        last_boundary = (after - 1) // SECTOR * SECTOR
        if after > before and last_boundary > before:
            candidates.add(last_boundary)
        before = after
    return sorted(c for c in candidates if c < current)


def count_states(log: WriteLog, point: int, policy: Policy | str, *, k: int = 8) -> int:
    """The exact number of states `policy` defines at `point` (independent of k, which only bounds enumeration)."""
    policy = _check_args(log, point, policy, k)
    if policy in (Policy.DROP_UNSYNCED, Policy.PREFIX):
        return 1
    if policy is Policy.SUBSETS:
        return 2 ** len(log.unsynced(point))
    if policy is Policy.TRUNCATE:
        return len(truncate_candidates(log, point))
    return sum(2**m - 2 for _, m in _tearable(log.unsynced(point)))


def _budget(k: int, samples: int) -> int:
    return max(2**k, samples)


def _enumerated_count(count: int, k: int, samples: int) -> int:
    """How many states `enumerate_states` returns for a space of `count` states."""
    return count if count <= _budget(k, samples) else samples


def enumerate_states(
    log: WriteLog, point: int, policy: Policy | str, *, k: int = 8, seed: int = 0, samples: int = 64
) -> list[CrashState]:
    """All of `policy`'s states at `point` if there are at most max(2**k, samples); else `samples` seeded distinct ones."""
    policy = _check_args(log, point, policy, k, samples)
    count = count_states(log, point, policy, k=k)
    unsynced = log.unsynced(point)
    everything = tuple(op.index for op in unsynced)
    garbage = seed if policy is Policy.GARBAGE else None

    def state(kept: tuple[int, ...], tears: Tears = (), size: int | None = None) -> CrashState:
        # (tuples of ascending indices by construction below: not checked again)
        return CrashState.trusted(point, policy, kept, tears, size, garbage)

    if policy is Policy.DROP_UNSYNCED:
        return [state(())]
    if policy is Policy.PREFIX:
        return [state(everything)]
    if policy is Policy.TRUNCATE:
        sizes = truncate_candidates(log, point)
        if count > _budget(k, samples):
            rng = random.Random(f"qcrash:{seed}:{point}:{policy}")
            middle = rng.sample(sizes[1:-1], samples - 2) if samples > 2 else []
            sizes = sorted(({sizes[0], sizes[-1]} | set(middle)) if samples >= 2 else set(sizes[:samples]))
        return [state(everything, size=c) for c in sizes]

    if policy is Policy.SUBSETS:

        def every() -> Iterator[CrashState]:
            for r in range(len(everything) + 1):
                for kept in itertools.combinations(everything, r):
                    yield state(kept)

        def drawn(rng: random.Random) -> Iterator[CrashState]:
            yield state(())
            yield state(everything)
            n = len(everything)
            omit = _shuffled_cycle(rng, everything)
            only = _shuffled_cycle(rng, everything)
            while True:
                left_out = next(omit)
                yield state(tuple(i for i in everything if i != left_out))
                yield state((next(only),))
                bits = rng.getrandbits(n)
                yield state(tuple(i for j, i in enumerate(everything) if bits >> j & 1))

    else:  # TORN, GARBAGE
        writes = _tearable(unsynced)

        def torn(op: HostOp, secs: Iterable[int]) -> CrashState:
            return state(everything, ((op.index, tuple(secs)),))

        def every() -> Iterator[CrashState]:
            for op, m in writes:
                for r in range(1, m):
                    for secs in itertools.combinations(range(m), r):
                        yield torn(op, secs)

        def drawn(rng: random.Random) -> Iterator[CrashState]:
            in_turn = _shuffled_cycle(rng, writes)
            while True:
                op, m = next(in_turn)
                yield torn(op, range(rng.randint(1, m - 1)))  # prefix tear: stopped after j sectors
                op, m = next(in_turn)
                yield torn(op, range(rng.randint(1, m - 1), m))  # suffix tear: only the tail landed
                op, m = rng.choice(writes)
                bits = 0
                while bits == 0 or bits == (1 << m) - 1:
                    bits = rng.getrandbits(m)
                yield torn(op, (j for j in range(m) if bits >> j & 1))

    if count <= _budget(k, samples):
        return list(every())
    # Tears share one stream so that torn and garbage draw the same tears for a seed.
    stream = "tears" if policy in (Policy.TORN, Policy.GARBAGE) else str(policy)
    return _distinct(drawn(random.Random(f"qcrash:{seed}:{point}:{stream}")), every, samples)


def _shuffled_cycle(rng: random.Random, items: Sequence):
    """Yield `items` forever, each pass in a fresh seeded random order."""
    items = list(items)
    while True:
        rng.shuffle(items)
        yield from items


def _distinct(draws: Iterator[CrashState], every: Callable[[], Iterator[CrashState]], samples: int) -> list[CrashState]:
    """The first `samples` distinct draws; if draws keep repeating, fill up from the exhaustive order.

    Only called when the space holds more than `samples` states, so the fill always completes.
    """
    seen: dict[tuple, CrashState] = {}
    for _ in range(20 * samples + 100):
        if len(seen) >= samples:
            break
        s = next(draws)
        seen.setdefault(s.choice, s)
    for s in every():
        if len(seen) >= samples:
            break
        seen.setdefault(s.choice, s)
    return list(seen.values())


def enumerate_point(
    log: WriteLog,
    point: int,
    policies: Iterable[Policy | str] = DEFAULT_POLICIES,
    *,
    k: int = 8,
    seed: int = 0,
    samples: int = 64,
) -> list[CrashState]:
    """The states of all `policies` at `point`, each choice once, under the first policy that produced it."""
    seen: dict[tuple, CrashState] = {}
    for policy in policies:
        for s in enumerate_states(log, point, policy, k=k, seed=seed, samples=samples):
            seen.setdefault(s.choice, s)
    return list(seen.values())
