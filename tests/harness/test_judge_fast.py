"""The judge's fast path (memo, shared read sets) against its full path, on the crash states seeded runs really judge."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest

from harness import snapshots
from harness.crashstates.images import as_bytes
from harness.fuzz.engine import example_seed, generate
from harness.imagememo import Memo
from harness.judge import Judge, Judged
from harness.points import Budget
from harness.runner import Runner
from harness.stats import Stats
from harness.targets.python import PythonTarget
from models.qcow2 import inject

CLUSTER_CLASSES = (512, 4096, 65536, 2 << 20)
DEV = Budget()
SMALL_DEEP = Budget(samples=3, states_per_op=6, recovery_points=2, recovery_every=1)


def _bytes(image):
    return None if image is None else as_bytes(image)


class Differential:
    """Stands in for the runner's judge: every state is judged by the full path first, then by the fast one, and both must agree."""

    def __init__(self, runner: Runner) -> None:
        self.fast = runner.judge
        self.full = Judge(runner.target, runner.budget, runner.seed, random.Random(), Stats(), fast=False)
        self.states = 0
        self.findings = 0
        self.verdicts: Counter[str] = Counter()

    def sweep(self, model):
        return self.fast.sweep(model)  # (the full path judges every view: it remembers none)

    def judge(self, where, image, model, log, *, deep: bool, key: bytes | None = None) -> Judged:
        self.full.rng.setstate(self.fast.rng.getstate())
        full = self.full.judge(where, as_bytes(image), model, log, deep=deep)  # (the full path: always one buffer)
        fast = self.fast.judge(where, image, model, log, deep=deep, key=key)
        state = where.state.id
        assert fast.finding == full.finding, f"state [{state}]: fast {fast.finding} != full {full.finding}"
        assert _bytes(fast.recovered) == full.recovered, f"state [{state}]: recovered images differ"
        assert fast.view == full.view, f"state [{state}]: read-only views differ"
        assert self.fast.rng.getstate() == self.full.rng.getstate(), f"state [{state}]: rng calls differ"
        self.states += 1
        self.findings += fast.finding is not None
        if fast.finding is not None:
            self.verdicts[fast.finding.verdict.value] += 1
        return fast


def run_differential(seed: int, cluster_size: int, budget: Budget, **pinned: str) -> tuple[Differential, Runner]:
    config, ops = generate(seed, {"cluster_size": str(cluster_size), **pinned}, "dev")
    runner = Runner(config, seed=seed, budget=budget)
    diff = Differential(runner)
    runner.judge = diff  # type: ignore[assignment]
    runner.run(ops)
    full, fast = diff.full.stats, runner.stats
    # The runner itself counts a few labels per snapshot operation; every other label is the judge's.
    fast_coverage = Counter({k: v for k, v in fast.coverage.items() if k not in snapshots.OP_COVERAGE})
    assert (full.crash_states, full.by_policy, full.by_site, full.coverage) == \
        (fast.crash_states, fast.by_policy, fast.by_site, fast_coverage)
    return diff, runner


@pytest.mark.parametrize("cluster_size", [*CLUSTER_CLASSES[:-1], pytest.param(CLUSTER_CLASSES[-1], marks=pytest.mark.slow)])
def test_fast_and_full_path_agree_on_every_state(cluster_size: int) -> None:
    states = 0
    for index in range(3 if cluster_size < (2 << 20) else 1):
        diff, _runner = run_differential(example_seed(7, index), cluster_size, DEV if index else SMALL_DEEP)
        states += diff.states
    assert states > 0


@pytest.mark.parametrize("bug", ["refcount-index-off-by-one", "repair-forgets-table",
                                 "copied-flag-wrong", "writethrough-no-flush"])
def test_fast_and_full_path_agree_on_findings(bug: str) -> None:
    # Injected bugs make states fail in each phase (raw data and check, recovery, crashed
    # recovery): the verdicts and their evidence must be the same on both paths.
    previous = inject.active()
    inject.set_active([bug])
    try:
        findings = 0
        for index in range(8):
            diff, _runner = run_differential(example_seed(11, index), (512, 4096, 65536)[index % 3], SMALL_DEEP,
                                             version="3", lazy_refcounts="on", cache_mode="writethrough")
            findings += diff.findings
            if findings:
                break
    finally:
        inject.set_active(previous)
    assert findings > 0, f"{bug}: no finding in 8 seeded examples, so the finding paths were not compared"


def test_memo_is_bounded_and_counts_hits() -> None:
    target = PythonTarget()
    memo = Memo(target, max_bytes=3000, max_entries=2)
    images = [bytes([i]) * 1000 for i in range(4)]
    first = [memo.facts(image) for image in images]
    assert len(memo._entries) == 2 and memo._bytes <= 3000
    assert memo.facts(images[-1]) is first[-1]
    assert memo.facts(images[0]) is not first[0]  # evicted, computed afresh
    for _ in range(2):
        memo.inspect(first[-1])
    assert (memo.hits, memo.misses) == (1, 1)


def test_memo_counts_a_buffer_its_entries_share_once() -> None:
    """Large images judged as extents over one base: the base counts once, each entry its own bytes, and the bound
    still evicts by what is held."""
    from harness.crashstates.images import Extents

    base = bytes(1 << 20)
    memo = Memo(PythonTarget(), max_bytes=(1 << 20) + 3000, max_entries=10)
    images = []
    for i in range(4):
        image = Extents(base)
        image.put(i * 4096, i * 4096 + 1000, bytes([i + 1]) * 1000, 0)
        images.append(image)
    first = [memo.facts(image) for image in images[:3]]
    assert all(type(f.data) is Extents for f in first)  # (the python target judges extents: never joined)
    assert len(memo._entries) == 3 and memo._bytes == (1 << 20) + 3000
    memo.facts(images[3])  # one more entry's own bytes: over the bound, the oldest goes and the base stays counted
    assert len(memo._entries) == 3 and memo._bytes == (1 << 20) + 3000
    assert not memo.has(first[0].key) and memo.has(first[1].key)
    joined = Memo(PythonTarget(), enabled=False).facts(images[0])
    assert type(joined.data) is bytes and joined.data == images[0].join()  # (the full path: one buffer)


def test_full_path_memoises_nothing() -> None:
    memo = Memo(PythonTarget(), enabled=False)
    facts = memo.facts(b"x" * 100)
    memo.inspect(facts)
    memo.inspect(facts)
    assert (memo.hits, memo.misses, len(memo._entries)) == (0, 0, 0)


def _snapshot_examples(count: int) -> list[int]:
    """Seeds of dev examples whose sequences hold a snapshot create (one in three do)."""
    out = []
    index = 0
    while len(out) < count:
        seed = example_seed(7, index)
        if any(type(op).__name__ == "SnapshotCreate" for op in generate(seed, {}, "dev")[1]):
            out.append(seed)
        index += 1
    return out


@pytest.mark.parametrize("cluster_size", CLUSTER_CLASSES[:-1])
def test_fast_and_full_path_agree_on_snapshot_rules(cluster_size: int) -> None:
    # The fast path reads each snapshot's sectors in runs, memoised per recovered image and
    # replayed from read plans; the full path reads them one at a time through the target's reader.
    many = 0
    real = PythonTarget.snapshots

    def counting(self, raw, **memo):  # (`reuse`: the runs then come from read plans, compared all the same)
        nonlocal many
        reader = real(self, raw, **memo)

        def read_many(name, sectors):
            nonlocal many
            many += 1
            got = reader.read_many(name, sectors)
            # The runs give exactly the bytes the one-by-one reads give, sector for sector.
            assert got == {s: reader.read(name, s * 512, 512) for s in sectors}, f"snapshot {name}: runs differ"
            return got
        return dataclasses.replace(reader, read_many=read_many)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PythonTarget, "snapshots", counting)
        states = 0
        for seed in _snapshot_examples(2):
            diff, _runner = run_differential(seed, cluster_size, DEV)
            states += diff.states
    assert states > 0 and many > 0, "no snapshot was read in runs, so the fast snapshot path was not compared"
