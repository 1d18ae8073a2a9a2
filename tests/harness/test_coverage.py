"""Structural-event coverage: which events an op causes, counted reached and crashed inside per configuration class, merged, and reported."""

from __future__ import annotations

from collections import Counter

from harness import coverage
from harness.config import Config
from harness.ops import Discard, Reopen, Write, WriteZeroes
from harness.runner import Budget, Runner
from harness.stats import Stats

SMALL = Config(version=3, cluster_size=512, lazy_refcounts=True, cache_mode="writeback", virtual_size=1 << 20)


def events(config: Config, ops, budget: Budget | None = None) -> dict:
    runner = Runner(config, budget=budget or Budget())
    assert runner.run(list(ops)) == []
    return coverage.table(runner.stats.events)[coverage.config_class(config)]


def test_range_events_follow_the_geometry():
    c = 512
    l2_cover = c * (c // 8)
    got = coverage.events_of(SMALL, Write(l2_cover - c, 2 * c), [])
    assert got == [coverage.L2_CROSS]
    assert coverage.events_of(SMALL, WriteZeroes(SMALL.virtual_size - c, c), []) == [coverage.DISK_END, coverage.ZERO_V3]
    assert coverage.events_of(SMALL, Discard(0, c), []) == []
    four_k = Config(cluster_size=4096)
    assert coverage.events_of(four_k, Discard(512, 1024), []) == [coverage.PARTIAL_DISCARD]
    v2 = Config(version=2, lazy_refcounts=False)
    assert coverage.events_of(v2, WriteZeroes(0, 512), []) == [coverage.ZERO_V2]


def test_run_counts_reached_and_crashed_inside():
    l2_cover = 512 * 64
    got = events(SMALL, [Write(0, 512), Write(l2_cover - 512, 1024), WriteZeroes(SMALL.virtual_size - 512, 512)])
    for name in (coverage.L2_ALLOC, coverage.L2_CROSS, coverage.DISK_END, coverage.ZERO_V3):
        assert got[name]["reached"] >= 1 and got[name]["crashed"] >= 1, name
    assert got[coverage.REFTABLE_GROW] == {"reached": 0, "crashed": 0}
    assert coverage.ZERO_V2 not in got  # not applicable to a v3 class


def test_without_a_sweep_events_are_reached_but_not_crashed_inside():
    got = events(SMALL, [Write(0, 512)], Budget(sweep=False))
    assert got[coverage.L2_ALLOC] == {"reached": 1, "crashed": 0}


def test_switches_count_only_while_dirty():
    # A lazy write leaves the image dirty until a clean close; the reopen's close comes after the check.
    dirty = events(SMALL, [Write(0, 512), Reopen(cache_mode="writethrough"), Reopen(lazy_refcounts=False)])
    assert dirty[coverage.CACHE_SWITCH]["reached"] == 1
    assert dirty[coverage.LAZY_SWITCH]["reached"] == 0  # the first reopen closed cleanly
    clean = events(SMALL, [Write(0, 512), Reopen(), Reopen(lazy_refcounts=False)])
    assert clean[coverage.LAZY_SWITCH]["reached"] == 0
    same = events(SMALL, [Write(0, 512), Reopen(cache_mode="writeback")])  # no change: no switch
    assert same[coverage.CACHE_SWITCH]["reached"] == 0
    assert events(SMALL, [Write(0, 512), Reopen(lazy_refcounts=False)])[coverage.LAZY_SWITCH]["reached"] == 1


def test_stats_merge_adds_events_and_round_trips():
    a, b = Stats(), Stats()
    a.events["x|e"] = 2
    b.events["x|e"] = 3
    b.events["x|e|crashed"] = 1
    a.merge(b)
    assert a.events == Counter({"x|e": 5, "x|e|crashed": 1})
    assert Stats.from_dict(a.to_dict()).events == a.events


def test_markdown_marks_never_reached():
    text = "\n".join(coverage.markdown(coverage.table({"v3 cluster 512 B-1 KiB|guest ops": 3,
                                                      "v3 cluster 512 B-1 KiB|L2 table allocated": 1})))
    assert "| new refcount block | 0 **(never reached)** | 0 |" in text
    assert "| L2 table allocated | 1 | 0 **(never crashed inside)** |" in text


def test_fuzz_summary_reports_events_per_class(tmp_path):
    import json

    from harness.cli import main

    assert main(["fuzz", "--examples", "3", "--seed", "1", "--config", "cluster_size=512", "-q",
                 "--report", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    table = summary["structural_events_by_class"]
    assert table and all(set(rows) >= {coverage.L2_ALLOC, coverage.REFTABLE_GROW} for rows in table.values())
    assert sum(r[coverage.L2_ALLOC]["reached"] for r in table.values()) >= 1
    assert "## Structural events reached and crashed inside" in (tmp_path / "summary.md").read_text()


def test_markdown_says_a_partial_discard_has_nothing_to_crash_and_sums_all_classes():
    text = "\n".join(coverage.markdown(coverage.table({
        "v3 cluster 512 B-1 KiB|guest ops": 3, "v3 cluster 512 B-1 KiB|discard of a partial cluster": 2,
        "v2 cluster 2-16 KiB|guest ops": 1, "v2 cluster 2-16 KiB|discard of a partial cluster": 1,
        "v2 cluster 2-16 KiB|discard of a partial cluster|crashed": 1})))
    assert "### all classes" in text
    assert "| discard of a partial cluster | 3 | 1 (whole clusters the same discards covered) |" in text
    assert "| discard of a partial cluster | 2 | 0 (reached; no host writes by construction" in text
    assert "never crashed inside" not in text.split("discard of a partial cluster")[1].split("\n")[0]
    # A never-reached refcount edge says how big a host file it takes in that class.
    assert "needs a host file over 2 MiB even at 512 B clusters, 64-bit refcounts" in text


def test_v2_classes_list_no_switch_while_dirty():
    rows = coverage.table({"v2 cluster 2-16 KiB|guest ops": 1, "v3 cluster 2-16 KiB|guest ops": 1})
    assert coverage.CACHE_SWITCH not in rows["v2 cluster 2-16 KiB"]  # v2 has no dirty bit
    assert coverage.CACHE_SWITCH in rows["v3 cluster 2-16 KiB"]
