"""The Hypothesis state machine: sequences of guest operations and crashes, drawn and shrunk together, run by the Runner."""

from __future__ import annotations

import os

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from harness.config import CACHE_MODES, REFCOUNT_BITS, Config
from harness.ops import (Check, Crash, Discard, Flush, Read, Reopen, Repair, SnapshotApply, SnapshotCreate,
                         SnapshotDelete, Write, WriteZeroes)
from harness.runner import Budget, Runner

SECTOR = 512


@st.composite
def configs(draw, fixed: dict | None = None) -> Config:
    """Configurations weighted toward small clusters; every axis can be pinned with `fixed`."""
    fixed = fixed or {}
    version = fixed.get("version", draw(st.sampled_from((3, 3, 3, 2))))
    bits = fixed.get("cluster_size", None)
    if bits is None:
        cluster_size = 1 << draw(st.sampled_from((9, 9, 10, 11, 12, 13, 16, 17, 21)))
    else:
        cluster_size = bits
    refcount = fixed.get("refcount_bits", 16 if version == 2 else draw(st.sampled_from(REFCOUNT_BITS)))
    lazy = fixed.get("lazy_refcounts", version == 3 and draw(st.booleans()))
    cache = fixed.get("cache_mode", draw(st.sampled_from(CACHE_MODES)))
    size = fixed.get("virtual_size", max(cluster_size * 8, 2 << 20))
    return Config(version=version, cluster_size=cluster_size, refcount_bits=refcount, lazy_refcounts=lazy,
                  cache_mode=cache, virtual_size=size)


def guest_range(config: Config):
    """Sector-aligned ranges weighted toward the first clusters (reuse) and cluster boundaries."""
    cs = config.cluster_size
    sectors = config.virtual_size // SECTOR
    per_cluster = cs // SECTOR
    hot = min(sectors, 8 * per_cluster)
    start = st.one_of(
        st.integers(0, 7).map(lambda c: min(c * per_cluster, sectors - 1)),
        st.integers(0, hot - 1),
        st.integers(0, sectors - 1),
    )
    count = st.one_of(st.just(per_cluster), st.integers(1, 8), st.integers(1, 3 * per_cluster))

    @st.composite
    def draw_range(draw):
        s = draw(start)
        n = min(draw(count), sectors - s)
        return s * SECTOR, max(1, n) * SECTOR

    return draw_range()


class CrashMachine(RuleBasedStateMachine):
    """Drives a Runner; any finding fails the example with a runnable reproduction."""

    fixed_config: dict = {}
    # The nightly profile sweeps every point of every op; CI and dev keep a bounded budget.
    budget = (Budget.exhaustive() if os.environ.get("QCRASH_PROFILE") == "nightly"
              else Budget(samples=2, states_per_op=4, recovery_every=8))
    last_ops: list = []  # the latest example's operations (Hypothesis replays the shrunk one last)
    last_config: Config | None = None

    def __init__(self) -> None:
        super().__init__()
        self.runner: Runner | None = None

    @initialize(data=st.data())
    def setup(self, data) -> None:
        config = data.draw(configs(type(self).fixed_config), label="config")
        self.runner = Runner(config, seed=0, budget=type(self).budget)
        type(self).last_config = config
        type(self).last_ops = self.runner.ops

    def _do(self, op) -> None:
        findings = self.runner.step(op)
        if findings:
            raise AssertionError(self._report(findings[0]))

    def _report(self, finding) -> str:
        ops = ",\n    ".join(repr(o) for o in self.runner.ops)
        return (f"{finding}\nrule: {finding.rule}\nconfig: {self.runner.config}\n"
                f"reproduce:\n  from harness.ops import *; from harness.config import Config; "
                f"from harness.runner import Runner, Budget\n"
                f"  Runner({self.runner.config!r}, seed={self.runner.seed}, budget={self.runner.budget!r}).run([\n"
                f"    {ops}])\n  QCRASH_INJECT={os.environ.get('QCRASH_INJECT', '')!r}")

    @rule(data=st.data())
    def write(self, data) -> None:
        off, n = data.draw(guest_range(self.runner.config), label="range")
        self._do(Write(off, n, data.draw(st.integers(0, 3), label="seed")))

    @rule(data=st.data())
    def write_zeroes(self, data) -> None:
        off, n = data.draw(guest_range(self.runner.config), label="range")
        self._do(WriteZeroes(off, n))

    @rule(data=st.data())
    def discard(self, data) -> None:
        off, n = data.draw(guest_range(self.runner.config), label="range")
        self._do(Discard(off, n))

    @rule(data=st.data())
    def read(self, data) -> None:
        off, n = data.draw(guest_range(self.runner.config), label="range")
        self._do(Read(off, n))

    @rule()
    def flush(self) -> None:
        self._do(Flush())

    @rule(lazy=st.sampled_from((None, True, False)), cache=st.sampled_from((None,) + CACHE_MODES))
    def reopen(self, lazy, cache) -> None:
        if self.runner.config.version < 3:
            lazy = None
        self._do(Reopen(lazy, cache))

    @rule(point=st.integers(-4, 40), policy=st.sampled_from(("prefix", "drop-unsynced", "subsets", "torn", "truncate")),
          state=st.integers(0, 15))
    def crash(self, point, policy, state) -> None:
        self._do(Crash(point, policy, state))

    @rule()
    def check(self) -> None:
        self._do(Check())

    @rule(mode=st.sampled_from(("leaks", "all")))
    def repair(self, mode) -> None:
        self._do(Repair(mode))

    @rule(kind=st.sampled_from((SnapshotCreate, SnapshotCreate, SnapshotApply, SnapshotDelete)),
          name=st.sampled_from(("s0", "s1")))
    def snapshot(self, kind, name) -> None:
        self._do(kind(name))

    def teardown(self) -> None:
        if self.runner is not None and not self.runner.findings:
            findings = self.runner.finish()
            if findings:
                raise AssertionError(self._report(findings[0]))


def machine_for(fixed_config: dict | None = None, budget: Budget | None = None) -> type[CrashMachine]:
    """A CrashMachine subclass with some configuration axes pinned."""
    attrs = {"fixed_config": dict(fixed_config or {}), "last_ops": [], "last_config": None}
    if budget is not None:
        attrs["budget"] = budget
    return type("PinnedCrashMachine", (CrashMachine,), attrs)
