"""The qemu target through the runner, shrinker, reproducer files and shell scripts: it can fail, and it passes what QEMU survives."""

from __future__ import annotations

import subprocess

import pytest

from harness.config import Config
from harness.fuzz import corpus
from harness.ops import Flush, Write
from harness.oracle import Verdict
from harness.points import Budget
from harness.runner import Runner
from harness.shrink import guest_op_count, shrink
from harness.targets.qemu.repro import artifacts_beside
from harness.targets.qemu.spec import TargetSpec, detail_of
from tests.conftest import requires_qemu

pytestmark = [pytest.mark.qemu, requires_qemu]

WRITETHROUGH = Config(cluster_size=4096, lazy_refcounts=True, cache_mode="writethrough", virtual_size=1 << 20)
# Only the durable image: with every flush dropped it is the image before the run, and a
# completed writethrough write must be in it.
DURABLE = Budget(policies=("drop-unsynced",), recovery_every=0)
OPS = [Write(0, 4096, 1), Write(65536, 1024, 2), Flush(), Write(8192, 512, 3), Write(0, 512, 4)]


def _run(spec: TargetSpec, config: Config, ops, budget: Budget):
    runner = Runner(config, seed=3, budget=budget, target=spec.make())
    try:
        return runner.run(ops), runner
    finally:
        runner.target.release()


def _no_flush() -> TargetSpec:
    # Resolved in the test, not at import: without qemu-utils the module must skip, not fail to collect.
    return TargetSpec("qemu", qemu_opts="cache.no-flush=on").resolved()


def test_no_flush_qemu_is_lost_data_and_shrinks(tmp_path) -> None:
    no_flush = _no_flush()
    findings, runner = _run(no_flush, WRITETHROUGH, OPS, DURABLE)
    assert findings and findings[0].verdict is Verdict.DATA_LOST, findings
    ops, budget, finding = shrink(WRITETHROUGH, list(runner.ops), 3, DURABLE, findings[0], seconds=30, target=no_flush)
    assert finding.verdict is Verdict.DATA_LOST and guest_op_count(ops) <= 2 < guest_op_count(OPS), ops
    rep = corpus.Reproducer(WRITETHROUGH, ops, 3, budget, finding, target="qemu", qemu=detail_of(no_flush))
    path = corpus.record(tmp_path, rep)
    assert corpus.load(path).qemu.qemu_opts == "cache.no-flush=on"

    # It replays from the JSON file ...
    from harness.cli.fuzz import replay_file

    status, detail, _sig = replay_file(str(path))
    assert status == "failing" and "data-lost" in detail, detail
    # ... and from the shell script, with QEMU alone: the sector reads as the durable image holds it.
    script = artifacts_beside(path, rep, no_flush)
    assert script is not None and script.with_suffix(".qcow2").exists()
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    dump = [line for line in out.stdout.splitlines() if line[8:11] == ":  "]
    assert len(dump) == 32  # one 512-byte sector
    assert all(line[11:58].replace(" ", "") == "0" * 32 for line in dump)  # the write never reached the durable image


def test_a_sequence_qemu_survives_gives_no_finding() -> None:
    spec = TargetSpec("qemu").resolved()
    findings, runner = _run(spec, WRITETHROUGH, OPS, Budget(recovery_every=2))
    assert findings == [] and runner.stats.crash_states > 10


def test_missing_qemu_exits_2_naming_the_package(tmp_path) -> None:
    from harness.cli import main

    code = main(["fuzz", "--target", "qemu", "--qemu-img", str(tmp_path / "nope"), "--examples", "1",
                 "--report", str(tmp_path / "r")])
    assert code == 2
