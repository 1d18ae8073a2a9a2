"""The Hypothesis state machine: sequences of guest operations and crashes, drawn and shrunk together, run by the Runner.

Every rule takes the same argument, `draws`: small integers that `harness.generate.Choices`
replays into the one generator `qcrash fuzz` uses. Hypothesis therefore prints each step as
a runnable call (`state.discard(draws=[2, 0, 513])`), shrinks the integers toward the
generator's first choices, and a failure also prints the operations as a Runner program.
"""

from __future__ import annotations

import os

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from harness import profiles
from harness.config import Config, draw_config
from harness.generate import DRAW_MAX, Choices, draw_op
from harness.ops import Op, SnapshotApply, SnapshotCreate, SnapshotDelete
from harness.ranges import Written
from harness.runner import Budget, Runner

# Enough integers for the longest draw (a configuration, or a range reusing an earlier one);
# missing ones read as 0, so shorter lists are simpler examples.
DRAWS = st.lists(st.integers(0, DRAW_MAX), max_size=8)


def configs(fixed: dict | None = None) -> st.SearchStrategy[Config]:
    """harness.config.draw_config as a strategy; every axis can be pinned with `fixed`."""
    return DRAWS.map(lambda draws: draw_config(Choices(draws), fixed))


class CrashMachine(RuleBasedStateMachine):
    """Drives a Runner; any finding fails the example with a runnable reproduction."""

    fixed_config: dict = {}
    budget: Budget | None = None  # None: the loaded profile's machine budget (harness.profiles)
    last_ops: list = []  # the latest example's operations (Hypothesis replays the shrunk one last)
    last_config: Config | None = None

    def __init__(self) -> None:
        super().__init__()
        self.runner: Runner | None = None
        self.written = Written()  # what the sequence wrote, so later ranges can aim at it

    @initialize(draws=DRAWS)
    def setup(self, draws) -> None:
        config = draw_config(Choices(draws), type(self).fixed_config)
        budget = type(self).budget or profiles.current().machine_budget
        self.runner = Runner(config, seed=0, budget=budget)
        type(self).last_config = config
        type(self).last_ops = self.runner.ops

    def _step(self, kind: str, draws: list[int]) -> None:
        self._run(draw_op(kind, Choices(draws), self.runner.config, self.written))

    def _run(self, op: Op) -> None:
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

    @rule(draws=DRAWS)
    def write(self, draws) -> None:
        self._step("write", draws)

    @rule(draws=DRAWS)
    def write_zeroes(self, draws) -> None:
        self._step("write_zeroes", draws)

    @rule(draws=DRAWS)
    def discard(self, draws) -> None:
        self._step("discard", draws)

    @rule(draws=DRAWS)
    def read(self, draws) -> None:
        self._step("read", draws)

    @rule()
    def flush(self) -> None:
        self._step("flush", [])

    @rule(draws=DRAWS)
    def reopen(self, draws) -> None:
        self._step("reopen", draws)

    @rule(draws=DRAWS)
    def crash(self, draws) -> None:
        self._step("crash", draws)

    @rule()
    def check(self) -> None:
        self._step("check", [])

    @rule(draws=DRAWS)
    def repair(self, draws) -> None:
        self._step("repair", draws)

    @rule(kind=st.sampled_from((SnapshotCreate, SnapshotCreate, SnapshotApply, SnapshotDelete)),
          name=st.sampled_from(("s0", "s1")))
    def snapshot(self, kind, name) -> None:
        self._run(kind(name))

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
