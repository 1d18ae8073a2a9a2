"""The differential runner: determinism, verdicts on hand-made scenarios, and what each judging step catches."""

from __future__ import annotations

import pytest

from harness.config import Config
from harness.fuzz.engine import example_seed, run_example
from harness.generate import generate
from harness.ops import Crash, Flush, Read, Reopen, Write, WriteZeroes, Discard, OpError
from harness.oracle import Verdict, digest
from harness.runner import Budget, Runner

SMALL = dict(cluster_size=512, virtual_size=1 << 20)


def run(config: Config, ops, budget=Budget()):
    return Runner(config, seed=3, budget=budget).run(ops)


def test_same_seed_same_run() -> None:
    """A seed fixes the operations, the crash states judged and their counts."""
    outs = [run_example((i, 77, {"cluster_size": "1024"}, "dev", [], False)) for i in (0, 1, 0, 1)]
    fingerprint = [digest([o.example_seed, str(o.config), o.ops, o.stats.crash_states, dict(o.stats.by_policy),
                           dict(o.stats.by_site), dict(o.stats.coverage)]) for o in outs]
    assert fingerprint[0] == fingerprint[2] and fingerprint[1] == fingerprint[3]
    assert fingerprint[0] != fingerprint[1]
    assert all(o.stats.crash_states > 0 for o in outs)


def test_shards_partition_the_seed_space() -> None:
    shard0 = {example_seed(5, 0 + 2 * j) for j in range(200)}
    shard1 = {example_seed(5, 1 + 2 * j) for j in range(200)}
    assert len(shard0) == len(shard1) == 200 and not shard0 & shard1


def test_generated_examples_are_valid_and_deterministic() -> None:
    for i in range(50):
        s = example_seed(9, i)
        assert generate(s, {}, "dev") == generate(s, {}, "dev")


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_correct_image_survives_a_scripted_sequence(lazy: bool, cache: str) -> None:
    config = Config(lazy_refcounts=lazy, cache_mode=cache, **SMALL)
    ops = [Write(0, 4096, 1), Write(8192, 512, 2), Flush(), Discard(0, 2048), Write(1024, 1024, 3),
           WriteZeroes(4096, 4096), Crash(-3, "subsets", 1), Write(0, 512, 4), Read(0, 8192), Reopen(), Read(0, 8192)]
    assert run(config, ops, Budget.exhaustive()) == []


def test_every_recovery_path_recovers_an_eager_refcounts_image() -> None:
    """Eager refcounts leave leaks at worst, which `check -r leaks` fixes too; each state names its path."""
    config = Config(lazy_refcounts=False, cache_mode="writeback", **SMALL)
    ops = [Write(0, 4096, 1), Flush(), Discard(0, 2048), Write(8192, 512, 2), Crash(-2, "subsets", 1),
           Write(512, 512, 3), Reopen()]
    budget = Budget(recovery_paths=("open", "check-all", "check-leaks"), recovery_every=1)
    runner = Runner(config, seed=3, budget=budget)
    assert runner.run(ops) == []
    assert runner.stats.coverage["recovered by check-all"] > 0 and runner.stats.coverage["recovered by check-leaks"] > 0


def test_ops_out_of_range_are_refused_with_the_rule() -> None:
    config = Config(**SMALL)
    with pytest.raises(OpError, match=r"op #0: Write.offset = 100: must be a non-negative multiple of 512"):
        Runner(config).step(Write(100, 512))
    with pytest.raises(OpError, match=r"must be non-empty and end within the virtual size 1048576"):
        Runner(config).step(Write(1 << 20, 512))


@pytest.mark.parametrize(
    "bug, config, ops, verdicts",
    [
        # The dirty bit reaches the disk in the same epoch as the L2 update it protects.
        ("dirty-no-flush", dict(lazy_refcounts=True, cache_mode="writeback"),
         [Write(0, 512, 1), Flush()], {Verdict.CORRUPTION_WITHOUT_DIRTY}),
        # Close clears the bit before the refcounts are written.
        ("dirty-cleared-early", dict(lazy_refcounts=True, cache_mode="writethrough"),
         [Write(0, 512, 1), Reopen()], {Verdict.CORRUPTION_WITHOUT_DIRTY}),
        # Eager refcounts, but the L2 table does not wait for the refcount block.
        ("l2-before-refblock", dict(lazy_refcounts=False, cache_mode="writeback"),
         [Write(0, 512, 1), Write(4096, 512, 2), Flush()], {Verdict.CORRUPTION_WITHOUT_DIRTY}),
        # writethrough returns before flushing: a completed write is lost.
        ("writethrough-no-flush", dict(lazy_refcounts=False, cache_mode="writethrough"),
         [Write(0, 512, 1), Write(4096, 512, 2)], {Verdict.DATA_LOST}),
        # A discarded cluster is reused before the L2 update that freed it is durable.
        ("reuse-before-free-durable", dict(lazy_refcounts=False, cache_mode="writeback"),
         [Write(0, 512, 1), Flush(), Discard(0, 512), Write(512, 512, 2), Flush()], {Verdict.FOREIGN_DATA}),
    ],
)
def test_injected_bug_gives_its_verdict(bug, config, ops, verdicts, injected) -> None:
    cfg = Config(cluster_size=512, virtual_size=1 << 20, **config)
    assert run(cfg, ops, Budget.exhaustive()) == [], "the correct implementation must pass the same sequence"
    injected(bug)
    found = run(cfg, ops, Budget.exhaustive())
    assert found, f"{bug} not detected"
    assert found[0].verdict in verdicts, str(found[0])
    assert found[0].crash_id, "a crash finding names its crash state"


def test_chosen_crash_then_continue_keeps_model_and_image_in_step() -> None:
    config = Config(lazy_refcounts=True, cache_mode="writeback", **SMALL)
    runner = Runner(config, seed=1, budget=Budget(sweep=False))
    for op in [Write(0, 1024, 1), Flush(), Write(0, 512, 2), Write(2048, 512, 3), Crash(-1, "drop-unsynced", 0)]:
        assert runner.step(op) == []
    # After dropping everything unsynced the durable writes survive and the later ones are gone.
    assert runner.step(Read(0, 4096)) == []
    assert runner.target.read(0, 512) == runner.model.read(0, 512)
    assert runner.target.read(2048, 512) == bytes(512)
    assert runner.finish() == []


@pytest.mark.qemu
def test_qemu_check_agrees_on_sampled_crash_images() -> None:
    import shutil

    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not found: install Debian's qemu-utils")
    config = Config(lazy_refcounts=True, cache_mode="writeback", **SMALL)
    runner = Runner(config, seed=5, budget=Budget(samples=4, states_per_op=6, qemu_every=1))
    findings = runner.run([Write(0, 4096, 1), Flush(), Write(8192, 512, 2), Discard(0, 1024), Reopen()])
    assert findings == []
    assert runner.stats.coverage["qemu-img check agreed"] >= 10


@pytest.mark.qemu
def test_qemu_disagreement_is_reported() -> None:
    """The comparison can fail: a refcount made wrong only for qcrash's checker is a disagreement."""
    import shutil

    from harness.qemu_check import qemu_disagreement
    from models.blockio import MemoryFile
    from models.qcow2 import Qcow2Image, check

    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not found: install Debian's qemu-utils")
    mem = MemoryFile()
    Qcow2Image.create(mem, 1 << 20, cluster_size=512)
    img = Qcow2Image.open(mem)
    img.write(0, b"x" * 512)
    img.close()
    assert qemu_disagreement(mem.getvalue()) is None
    original = check.check
    try:
        check.check = lambda f, fix=check.Fix.NONE, **kw: dataclasses_replace(original(f, fix, **kw), leaks=3)
        assert "qemu-img check" in qemu_disagreement(mem.getvalue())
    finally:
        check.check = original


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_runner_takes_a_target_instance_and_exposes_its_log_and_images() -> None:
    """What the shrinker and the finding files read: the log (`ff`), crash images (`executor.builder`), the target."""
    from harness.crashstates import CrashState, Policy
    from harness.targets.python import PythonTarget

    target = PythonTarget()
    runner = Runner(Config(**SMALL), seed=1, budget=Budget(sweep=False), target=target)
    assert runner.target is target
    assert runner.step(Write(0, 512, 1)) == []
    assert runner.ff.point() == len(target.log) > 0
    durable = runner.executor.builder.build(CrashState(0, Policy.PREFIX))
    assert bytes(durable) == target.log.base


def test_snapshot_ops_refused_or_unknown_are_no_ops_on_both_sides() -> None:
    from harness.ops import SnapshotApply, SnapshotCreate, SnapshotDelete

    runner = Runner(Config(**SMALL, refcount_bits=1), seed=1)
    findings = runner.run([Write(0, 512, 1), SnapshotCreate("s0"), SnapshotApply("s0"), SnapshotDelete("nope"),
                           Read(0, 512)])
    assert not findings, findings
    assert runner.stats.coverage["snapshot refused (refcount would overflow)"] == 1
    assert runner.stats.coverage["snapshot op on a missing name skipped"] == 2
    assert runner.model.snapshot_names() == []


def test_snapshot_ops_are_swept_and_survive_a_crash_and_the_finish() -> None:
    from harness.ops import SnapshotApply, SnapshotCreate

    runner = Runner(Config(**SMALL, cache_mode="writethrough"), seed=2)
    findings = runner.run([Write(0, 1024, 1), SnapshotCreate("s0"), Write(0, 512, 2), SnapshotApply("s0"),
                           Crash(-1), Read(0, 1024)])
    assert not findings, findings
    assert runner.stats.coverage["crashed inside a snapshot create"] > 0
    assert runner.stats.coverage["crashed inside a snapshot apply"] > 0
    assert runner.model.snapshot_names() == ["s0"]


def test_the_report_lists_every_snapshot_coverage_label() -> None:
    """A fuzz summary keeps the snapshot situations the runner counts (shared clusters, copy-on-write, ops)."""
    from harness.fuzz.report import COVERAGE_KEYS
    from harness.ops import SnapshotCreate, SnapshotDelete
    from harness.snapshots import CRASH_COVERAGE, OP_COVERAGE

    runner = Runner(Config(**SMALL, cache_mode="writethrough"), seed=2)
    findings = runner.run([Write(0, 1024, 1), SnapshotCreate("s0"), Write(0, 512, 2), Write(65536, 512, 3),
                           SnapshotDelete("s0"), Read(0, 1024)])
    assert not findings, findings
    seen = {k for k, v in runner.stats.coverage.items() if v}
    assert {"refcount above 1 reached", "crashed inside a snapshot create", "crashed inside a snapshot delete",
            "crashed inside a write while snapshots share clusters"} <= seen, seen
    assert set(OP_COVERAGE) | set(CRASH_COVERAGE) <= set(COVERAGE_KEYS)
