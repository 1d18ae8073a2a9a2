"""Which crash states a run judges: the `Budget`, the pure choice of points and states in one guest op's span, and the state a `Crash` op names."""

from __future__ import annotations

import dataclasses
import random
import zlib
from typing import Protocol

from harness.crashstates import DEFAULT_POLICIES, CrashState, Policy, enumerate_point, enumerate_states
from harness.faultfile import HostOpKind, WriteLog
from harness.errors import QcrashError
from harness.ops import Crash
from harness.targets import RecoveryPath
from models.blockio import WriteSite

# Points just after these writes are rare (a few per run) and are where lazy-refcount and
# table-growth bugs live, so a sample of a long op's points favours them.
RAREST_SITES = frozenset({WriteSite.REFTABLE_GROW, WriteSite.REFTABLE_SWITCH})
RARE_SITES = frozenset({WriteSite.REFTABLE_GROW, WriteSite.REFTABLE_SWITCH, WriteSite.REFBLOCK_ALLOC,
                        WriteSite.REFTABLE, WriteSite.L1, WriteSite.DIRTY_BIT, WriteSite.HEADER})


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much of the crash space one run explores."""

    sweep: bool = True  # judge crash states at the points of every guest op
    policies: tuple[str, ...] = tuple(str(p) for p in DEFAULT_POLICIES)
    k: int = 8  # subsets: exhaustive up to 2**k
    samples: int = 4  # states per policy per point when the space is larger
    states_per_op: int = 12  # judged states per guest op at most (seeded sample across its points)
    recovery_points: int = 2  # crash points sampled in each recovery log (step 3)
    recovery_every: int = 4  # step 3 runs on one judged state in this many (0 = never)
    qemu_every: int = 0  # real qemu-img check on one raw crash image in this many (0 = never)
    # How crash images are brought back (RecoveryPath values): one path per state, chosen from its
    # id (`recovery_path`). Strings, like `policies`, so a Budget's repr is a runnable program.
    recovery_paths: tuple[str, ...] = (str(RecoveryPath.OPEN),)

    def __post_init__(self) -> None:
        known = ", ".join(repr(str(p)) for p in RecoveryPath)
        if not self.recovery_paths:
            raise QcrashError(f"Budget.recovery_paths = (): must name at least one recovery path of {known}")
        for path in self.recovery_paths:
            if path not in {str(p) for p in RecoveryPath}:
                raise QcrashError(f"Budget.recovery_paths: {path!r} is not a recovery path; choose from {known}")

    @classmethod
    def exhaustive(cls) -> "Budget":
        return cls(samples=16, states_per_op=10_000, recovery_points=8, recovery_every=1)


class PointSpan(Protocol):
    """The host-op points of one guest op: crash points start+1 .. end."""

    start: int
    end: int


def choose_points(log: WriteLog, span: PointSpan, budget: Budget, rng: random.Random) -> list[int]:
    """The crash points of `span` to judge, ascending; the last point (the op completed) is always among them.

    Long ops (a big write, a refcount-table growth) have more points than the budget;
    then half the sample goes to points just after rare metadata writes (new refcount
    blocks, table growth and switch, L1, dirty bit), which data points would otherwise
    drown out. The rarest sites are taken first, without drawing.
    """
    points = list(range(span.start + 1, span.end + 1))
    if len(points) <= budget.states_per_op:
        return points
    ops = log.ops
    inner = points[:-1]
    rarest = [p for p in inner if ops[p - 1].site in RAREST_SITES and ops[p - 1].kind is HostOpKind.WRITE]
    rare = [p for p in inner if ops[p - 1].kind is HostOpKind.WRITE and ops[p - 1].site in RARE_SITES]
    want = budget.states_per_op - 1
    chosen = set(rarest[:want // 2])
    # The order of the rng calls below is part of every seed's behaviour digest.
    chosen |= set(rng.sample(rare, min(len(rare), max(0, want // 2 - len(chosen)))))
    rest = [p for p in inner if p not in chosen]
    chosen |= set(rng.sample(rest, min(len(rest), want - len(chosen))))
    return sorted(chosen | {points[-1]})


def choose_states(log: WriteLog, points: list[int], budget: Budget, seed: int, rng: random.Random) -> list[CrashState]:
    """Up to `budget.states_per_op` crash states at `points`, round-robin so every point is judged before any gets a second."""
    per_point = []
    for point in points:
        states = enumerate_point(log, point, budget.policies, k=budget.k, seed=seed, samples=budget.samples)
        rng.shuffle(states)
        per_point.append(states)
    chosen: list[CrashState] = []
    while len(chosen) < budget.states_per_op and any(per_point):
        for states in per_point:
            if states and len(chosen) < budget.states_per_op:
                chosen.append(states.pop())
    return chosen


def recovery_path(budget: Budget, state: CrashState) -> RecoveryPath:
    """The path that recovers `state`: a function of its id alone, so a replay recovers it the same way."""
    paths = budget.recovery_paths
    if len(paths) == 1:
        return RecoveryPath(paths[0])
    return RecoveryPath(paths[zlib.crc32(state.id.encode()) % len(paths)])


def resolve_crash(log: WriteLog, op: Crash, budget: Budget, seed: int) -> CrashState:
    """The crash state a Crash op names in `log` (modular choice, or an exact id)."""
    if op.crash_id is not None:
        state = CrashState.parse(op.crash_id)
        problems = state.problems(log)
        if problems:
            raise ValueError(f"Crash.crash_id = {op.crash_id!r} does not fit the log: " + "; ".join(problems))
        return state
    npoints = len(log) + 1
    point = op.point % npoints if op.point >= 0 else max(0, npoints + op.point)
    states = enumerate_states(log, point, op.policy, k=budget.k, seed=seed, samples=budget.samples)
    if not states:
        states = enumerate_states(log, point, Policy.PREFIX)
    return states[op.state % len(states)]


def crash_op_for(log: WriteLog, state: CrashState, budget: Budget, seed: int) -> Crash:
    """A modular Crash op that selects `state` in `log` (what the shrinker starts from)."""
    states = enumerate_states(log, state.point, state.policy, k=budget.k, seed=seed, samples=budget.samples)
    # The point is counted back from the end of the log, so the shrinker can drop earlier
    # operations without moving the crash off the host op it was at.
    back = state.point - (len(log) + 1)
    for i, s in enumerate(states):
        if s == state:
            return Crash(back, str(state.policy), i)
    return Crash(back, str(state.policy), 0, crash_id=state.id)
