"""The short zoo run of the test suite: every injected bug is detected within a fixed number of seeded examples."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.fuzz import engine as fz
from harness.shrink import guest_op_count
from models.qcow2.inject import BUGS

MAX_EXAMPLES = 400  # deterministic: the same seed finds each bug at the same example every run


@pytest.mark.slow
@pytest.mark.parametrize("bug", sorted(BUGS))
def test_bug_detected(bug: str, tmp_path: Path) -> None:
    # In-process (jobs=1) the example switches the bug on here; the conftest fixture switches it off.
    opts = fz.FuzzOptions(examples=MAX_EXAMPLES, seed=1, jobs=1, profile="dev", corpus=tmp_path, inject=[bug],
                          shrink=False, stop_after_findings=1)
    result = fz.fuzz(opts)
    assert result.findings, f"{bug} not detected in {len(result.outcomes)} examples"


def test_correct_implementation_passes_the_same_examples(tmp_path: Path) -> None:
    result = fz.fuzz(fz.FuzzOptions(examples=60, seed=1, jobs=1, profile="dev", corpus=tmp_path, shrink=False))
    assert not result.findings, list(result.findings)
    assert result.stats.crash_states > 500


@pytest.mark.slow
def test_shrunk_reproducer_is_small(tmp_path: Path) -> None:
    opts = fz.FuzzOptions(examples=100, seed=1, jobs=1, profile="dev", corpus=tmp_path, inject=["dirty-no-flush"],
                          shrink=True, stop_after_findings=1)
    result = fz.fuzz(opts)
    found = [o for o in result.outcomes if o.reproducer is not None]
    assert found and guest_op_count(found[0].reproducer.ops) <= 3, found[0].reproducer.ops if found else None
