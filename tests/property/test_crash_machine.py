"""The Hypothesis state machine over the runner: the correct image passes; each injected bug is found and shrunk small."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from harness.fuzz.machine import CrashMachine, machine_for
from harness.ops import Crash, Read
from harness.runner import Budget

# Long property runs: marked so they can be chosen (-m slow) or left out locally (-m "not slow"); CI runs them.
pytestmark = pytest.mark.slow

_profile = settings()  # the loaded profile (dev, ci or nightly)


class TestCorrectImage(CrashMachine.TestCase):
    settings = settings(_profile, max_examples=max(10, _profile.max_examples // 2), stateful_step_count=12)


# Bugs and the configuration axes a user would pin to hunt them (the rest stays drawn).
# (reuse-before-free-durable needs a four-step recipe that random rules rarely line up;
# tests/harness/test_runner.py scripts it and the zoo hunts it with the fuzzer.)
BUG_HUNTS = [
    ("dirty-no-flush", {"lazy_refcounts": True, "version": 3}),
    ("dirty-cleared-early", {"lazy_refcounts": True, "version": 3}),
    ("l2-before-refblock", {"lazy_refcounts": False, "cache_mode": "writeback"}),
    ("writethrough-no-flush", {"cache_mode": "writethrough"}),
]


@pytest.mark.parametrize("bug, pinned", BUG_HUNTS, ids=[b for b, _ in BUG_HUNTS])
def test_injected_bug_found_and_shrunk(bug: str, pinned: dict, injected) -> None:
    machine = machine_for({"cluster_size": 512, "virtual_size": 1 << 20, **pinned},
                          budget=Budget(samples=4, states_per_op=32, recovery_every=4))
    injected(bug)
    with pytest.raises(AssertionError) as info:
        run_state_machine_as_test(machine, settings=settings(
            _profile, max_examples=300, stateful_step_count=10, database=None, print_blob=False))
    assert "reproduce:" in str(info.value) and "Runner(" in str(info.value)
    # Hypothesis replays the shrunk example last: that is the reproducer it reports.
    guest_ops = [op for op in machine.last_ops if not isinstance(op, (Crash, Read))]
    assert len(guest_ops) <= 4, f"{bug}: shrunk case has {len(guest_ops)} guest operations: {machine.last_ops}"
