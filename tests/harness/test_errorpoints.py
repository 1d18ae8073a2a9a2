"""Error points in the fuzz flow: the zoo's error-handling bugs are found by the fuzz engine, recorded, replayed and shrunk; dev and ci stay off."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import errorpoints, profiles
from harness.cli.fuzz import replay_file
from harness.fuzz import corpus
from harness.fuzz import engine as fz
from harness.fuzz import zoo
from harness.fuzz.report import build_summary
from models.qcow2 import inject

EXAMPLES = 12  # deterministic: seed 1 finds each error-handling bug within the first few examples


def _fuzz(tmp_path: Path, bugs: list[str], **kw) -> fz.FuzzResult:
    opts = fz.FuzzOptions(examples=EXAMPLES, seed=1, jobs=1, profile="dev", corpus=tmp_path, inject=bugs,
                          error_examples=1.0, **kw)
    return fz.fuzz(opts)


@pytest.mark.parametrize("bug", sorted(inject.ERROR_BUGS))
def test_error_bug_found_recorded_and_replayed(bug: str, tmp_path: Path) -> None:
    result = _fuzz(tmp_path, [bug], shrink=True, stop_after_findings=1)
    assert result.findings, f"{bug} not found in {len(result.outcomes)} examples"
    sig, path = next(iter(result.findings.items()))
    assert sig.startswith("error-"), sig
    rep = corpus.load(path)
    assert rep.errors is not None and rep.inject == [bug]
    assert len(rep.ops) <= rep.shrunk_from
    verdict, detail, now = replay_file(str(path))
    assert verdict == "failing" and now == sig, detail
    # The same file without the bug: the error is handled, the finding is gone.
    assert replay_file(str(path), [])[0] == "fixed"


def test_correct_implementation_passes_the_same_examples(tmp_path: Path) -> None:
    result = _fuzz(tmp_path, [], shrink=False)
    assert not result.findings, list(result.findings)
    judged = sum(o.error_points for o in result.outcomes)
    assert judged > 200
    summary = build_summary(result, fz.FuzzOptions(examples=EXAMPLES, seed=1, corpus=tmp_path), argv=[])
    assert summary["error_points_judged"] == judged and summary["error_examples"] == EXAMPLES


def test_dev_and_ci_sweep_no_error_points_nightly_some() -> None:
    assert profiles.get("dev").error_examples == 0 and profiles.get("ci").error_examples == 0
    out = fz.run_example((0, 1, {}, "dev", [], False))
    assert out.error_points == 0
    picked = [errorpoints.chosen(profiles.get("nightly").error_examples, fz.example_seed(1, i)) for i in range(200)]
    assert 20 < sum(picked) < 80  # a seeded share near 25 %
    assert picked == [errorpoints.chosen(profiles.get("nightly").error_examples, fz.example_seed(1, i))
                      for i in range(200)]


def test_zoo_covers_the_error_bugs() -> None:
    assert set(inject.ERROR_BUGS) <= set(zoo.BUGS)


def test_reproducer_python_is_runnable(tmp_path: Path) -> None:
    result = _fuzz(tmp_path, ["eio-write-swallowed"], shrink=False, stop_after_findings=1)
    rep = corpus.load(next(iter(result.findings.values())))
    code = rep.python().replace("print(", "found = (")
    scope: dict = {}
    try:
        exec(code, scope)  # noqa: S102 - the file's own reproduction snippet
    finally:
        inject.set_active([])
    assert scope["found"] is not None and scope["found"].signature() == rep.signature


def test_a_failed_repair_is_swept_and_the_next_repair_completes() -> None:
    from harness.config import Config
    from harness.ops import Flush, Write

    config = Config(cluster_size=4096, lazy_refcounts=True, cache_mode="writeback")
    ops = [Write(0, 8192, 1), Write(1 << 20, 4096, 2), Flush(), Write(65536, 512, 3)]
    w, _index = errorpoints.workload(config, ops)
    points = errorpoints.errorsweep.repair_error_points(errorpoints.errorsweep.dirty_image(w))
    assert any(p.op == "write" for p in points) and any(p.op == "flush" for p in points)
    for point in points:
        assert errorpoints.replay(config, ops, errorpoints.ErrorCase(point, "repair")) is None, point


def test_fuzz_command_sweeps_error_points_on_request(tmp_path: Path) -> None:
    from harness.cli import main

    try:
        status = main(["fuzz", "--examples", "6", "--seed", "1", "--error-examples", "1", "--inject",
                       "eio-write-swallowed", "-x", "--no-shrink", "--report", str(tmp_path)])
    finally:
        inject.set_active([])
    summary = (tmp_path / "summary.json").read_text()
    assert status == 1 and '"error-swallowed": 1' in summary, summary
    assert "error points judged" in (tmp_path / "summary.md").read_text()
    assert main(["fuzz", "--examples", "1", "--error-examples", "2", "--report", str(tmp_path / "bad")]) == 2


def test_the_sweep_collects_the_garbage_of_large_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each error point's images sit in reference cycles: the sweep collects after large ones (harness/heap.py)."""
    from harness import heap
    from harness.config import Config
    from harness.ops import Flush, Write

    collections: list[int] = []
    real = heap.gc.collect
    monkeypatch.setattr(heap.gc, "collect", lambda *a: collections.append(1) or real(*a))
    config = Config(cluster_size=4096, lazy_refcounts=True, cache_mode="writeback")
    ops = [Write(0, 8192, 1), Flush(), Write(65536, 512, 3)]
    errorpoints.sweep(config, ops, seed=1, max_runs=6)
    assert not collections, "a small image counted toward a collection"
    monkeypatch.setattr(heap, "_COLLECT_ABOVE", 1)
    monkeypatch.setattr(heap, "_COLLECT_EVERY", 1)
    result = errorpoints.sweep(config, ops, seed=1, max_runs=6)
    assert result.finding is None and len(collections) >= result.judged


def test_an_example_collects_its_young_generation_less_often_and_restores_the_threshold() -> None:
    """Inside `frozen_heap` (an example) the young generation is collected every `_YOUNG` allocations; outside,
    and after nested scopes end, the thresholds are the caller's again (harness/heap.py)."""
    import gc

    from harness import heap

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with heap.frozen_heap():
            assert gc.get_threshold() == (heap._YOUNG, 10, 10)
            with heap.frozen_heap():  # (the error sweep's scope inside an example's)
                assert gc.get_threshold() == (heap._YOUNG, 10, 10)
            assert gc.get_threshold() == (heap._YOUNG, 10, 10), "a nested scope's end restored the default"
        assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(20000, 5, 5)  # a caller's own larger threshold is kept
        with heap.frozen_heap():
            assert gc.get_threshold() == (20000, 5, 5)
        assert gc.get_threshold() == (20000, 5, 5)
    finally:
        gc.set_threshold(*before)


_RSS_PROBE = r"""
import os, sys
from harness import heap

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if sys.argv[1] == "tuned":
    with heap.frozen_heap():
        pass
    assert heap._TUNED == [True]  # (set by the scope, not by this probe)
before = rss()
big = bytearray(b"\x01") * (30 << 20)  # freed: glibc's own threshold rises to 30 MiB
del big
image = bytearray(b"\x01") * (24 << 20)  # a joined 2 MiB-cluster image, every page touched
del image
print((rss() - before) >> 20)
"""


def test_an_examples_freed_large_image_goes_back_to_the_system() -> None:
    """Inside an example glibc mmaps blocks from 16 MiB, so a freed 24 MiB image leaves the worker's RSS at once,
    even after a larger block raised glibc's own threshold (harness/heap.py, `tune_malloc`). The control run,
    untuned, keeps it: what made `collect_after` trim the heap, at a quarter of a 2 MiB-cluster example's time."""
    import subprocess
    import sys

    from harness import heap

    if heap._MALLOPT is None:
        pytest.skip("not glibc: its malloc thresholds do not apply")
    kept = {}
    for mode in ("tuned", "default"):
        out = subprocess.run([sys.executable, "-c", _RSS_PROBE, mode], capture_output=True, text=True, check=True)
        kept[mode] = int(out.stdout)
    assert kept["tuned"] <= 2, kept
    assert kept["default"] >= 20, kept  # (the control: without the tuning the probe fails)
