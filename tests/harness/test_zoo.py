"""The short zoo run of the test suite: every injected bug is detected within a fixed number of seeded examples."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.fuzz import engine as fz
from harness.shrink import guest_op_count
from harness.config import Config
from harness.ops import Discard, Write
from harness.runner import Budget, Runner
from models.qcow2.inject import BUGS, EDGE_BUGS

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


# Each edge bug, by a scripted pair: the same operation at the structure edge is found, away from it passes.
KiB, MiB = 1 << 10, 1 << 20
EDGE_CASES = [
    ("l2-crossing-write-one-table", dict(cluster_size=512, virtual_size=MiB),  # an L2 table maps 32 KiB
     [Write(32 * KiB - 512, 1024, 1)], [Write(32 * KiB - 1024, 1024, 1)]),
    ("discard-tail-whole-cluster", dict(cluster_size=4096, virtual_size=MiB),
     [Write(MiB - 4096, 4096, 1), Discard(MiB - 2048, 2048)], [Write(MiB - 8192, 4096, 1), Discard(MiB - 6144, 2048)]),
    ("refblock-alloc-no-flush", dict(cluster_size=512, virtual_size=MiB, lazy_refcounts=False),  # a block counts 256
     [Write(0, 256 * 512, 1)], [Write(0, 64 * 512, 1)]),
]


def test_every_edge_bug_is_in_the_zoo() -> None:
    assert {bug for bug, *_ in EDGE_CASES} == set(EDGE_BUGS) <= set(BUGS)


@pytest.mark.parametrize("bug, config, at_edge, away", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_edge_bug_shows_only_at_its_edge(bug: str, config: dict, at_edge: list, away: list, injected) -> None:
    cfg = Config(cache_mode="writeback", **config)
    assert Runner(cfg, seed=3, budget=Budget()).run(at_edge) == [], "the correct implementation must pass"
    injected(bug)
    assert Runner(cfg, seed=3, budget=Budget()).run(away) == [], f"{bug} showed away from its edge"
    assert Runner(cfg, seed=3, budget=Budget()).run(at_edge), f"{bug} not found at its edge"
