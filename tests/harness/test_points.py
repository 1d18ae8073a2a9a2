"""The pure point chooser: which crash points of one guest op's span are judged, and in which states."""

from __future__ import annotations

import random

import pytest
from types import SimpleNamespace

from harness.crashstates import CrashState, Policy
from harness.faultfile import HostOpKind, WriteLog
from harness.errors import QcrashError
from harness.points import Budget, choose_points, choose_states, recovery_path
from harness.targets import RecoveryPath
from models.blockio import WriteSite


def log_of(sites: list[WriteSite | None]) -> WriteLog:
    """A log of one 512-byte write per site (None: a flush)."""
    log = WriteLog(bytes(4096))
    for i, site in enumerate(sites):
        if site is None:
            log.append(HostOpKind.FLUSH, 0, b"", WriteSite.OTHER, 4096)
        else:
            log.append(HostOpKind.WRITE, (i % 8) * 512, bytes([i]) * 512, site, 4096)
    return log


def span(start: int, end: int) -> SimpleNamespace:
    return SimpleNamespace(start=start, end=end)


def test_a_short_span_gives_every_point_without_drawing() -> None:
    log = log_of([WriteSite.DATA] * 5)
    rng = random.Random(1)
    state = rng.getstate()
    assert choose_points(log, span(1, 5), Budget(states_per_op=12), rng) == [2, 3, 4, 5]
    assert rng.getstate() == state, "no draw when every point fits the budget"


def test_a_long_span_is_sampled_within_budget_keeping_the_last_point_and_the_rarest_sites() -> None:
    sites = [WriteSite.DATA] * 200
    sites[17] = WriteSite.REFTABLE_GROW  # host op 17 -> crash point 18 (just after it)
    sites[90] = WriteSite.REFTABLE_SWITCH
    log = log_of(sites)
    budget = Budget(states_per_op=10)
    for seed in range(20):
        points = choose_points(log, span(0, 200), budget, random.Random(seed))
        assert len(points) == budget.states_per_op
        assert points == sorted(set(points)) and all(1 <= p <= 200 for p in points)
        assert points[-1] == 200, "the op's completion point is always judged"
        assert {18, 91} <= set(points), "points after table growth and switch are always taken"


def test_rare_metadata_points_fill_half_the_sample_before_data_points() -> None:
    sites = [WriteSite.DATA] * 200
    sites[60] = WriteSite.DIRTY_BIT
    sites[150] = WriteSite.L1
    log = log_of(sites)
    for seed in range(20):
        points = choose_points(log, span(0, 200), Budget(states_per_op=10), random.Random(seed))
        assert {61, 151} <= set(points)


def test_the_choice_is_a_function_of_the_seed() -> None:
    log = log_of([WriteSite.DATA, WriteSite.REFBLOCK, WriteSite.L2, None] * 30)
    budget = Budget(states_per_op=7)
    a = choose_points(log, span(3, 110), budget, random.Random("x"))
    b = choose_points(log, span(3, 110), budget, random.Random("x"))
    c = choose_points(log, span(3, 110), budget, random.Random("y"))
    assert a == b
    assert a != c


def test_states_are_spread_round_robin_over_the_points() -> None:
    log = log_of([WriteSite.DATA] * 6)
    budget = Budget(policies=(str(Policy.SUBSETS), str(Policy.PREFIX)), states_per_op=4, k=4)
    states = choose_states(log, [2, 4, 6], budget, seed=0, rng=random.Random(0))
    assert len(states) == 4
    assert [s.point for s in states[:3]] == [2, 4, 6], "every point gets one state before any gets a second"


def test_each_state_has_one_recovery_path_fixed_by_its_id() -> None:
    every = Budget(recovery_paths=("open", "check-all", "check-leaks"))
    states = [CrashState(p, Policy.PREFIX) for p in range(60)]
    paths = [recovery_path(every, s) for s in states]
    assert paths == [recovery_path(every, s) for s in states]
    assert set(paths) == set(RecoveryPath), "sixty states use every path"
    assert {recovery_path(Budget(), s) for s in states} == {RecoveryPath.OPEN}


def test_a_budget_without_recovery_paths_is_refused_by_name() -> None:
    with pytest.raises(QcrashError, match=r"Budget.recovery_paths = \(\): must name at least one recovery path"):
        Budget(recovery_paths=())
    with pytest.raises(QcrashError, match=r"'check' is not a recovery path; choose from 'open', 'check-all', 'check-leaks'"):
        Budget(recovery_paths=("open", "check"))
    assert eval(repr(Budget(recovery_paths=("check-all",))), {"Budget": Budget}) == Budget(recovery_paths=("check-all",))
