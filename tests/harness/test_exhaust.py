"""qcrash exhaust: finds an injected bug in a tiny run and nothing without it; resumes to the same totals; shards partition the sequences."""

from __future__ import annotations

import dataclasses
import json

import pytest

from harness import exhaust
from harness.fuzz import corpus

TINY = exhaust.config_classes({"cluster_size": "512"})


def plan(**kw) -> exhaust.Plan:
    args = dict(alphabet="small", configs=tuple(TINY), ops=2, budget=exhaust.BUDGET)
    return exhaust.Plan(**{**args, **kw})


def test_small_alphabet_counts_every_sequence_up_to_n():
    # 3 letters: 3 sequences of one op, 9 of two.
    assert len(list(plan().items())) == 3 + 9
    assert len(list(plan(ops=1).items())) == 3


def test_finds_an_injected_bug_and_passes_without_it(tmp_path, injected):
    clean = exhaust.run(plan(), tmp_path / "clean")
    assert clean["complete"] and clean["sequences"] == 12 and clean["crash_states"] > 0
    assert clean["sequences_with_findings"] == 0
    assert not list((tmp_path / "clean").glob("*-main.json"))

    buggy = exhaust.run(plan(inject=("dirty-not-cleared",)), tmp_path / "bug")
    assert buggy["sequences_with_findings"] > 0
    files = list((tmp_path / "bug").glob("*-dirty-not-cleared.json"))
    assert files, "a finding is recorded as a reproducer file"
    rep = corpus.load(files[0])
    assert rep.inject == ["dirty-not-cleared"] and 1 <= len(rep.ops) <= 2


def test_resume_after_an_interrupted_run_gives_the_same_totals(tmp_path):
    whole = exhaust.run(plan(), tmp_path / "whole")

    class Stop(Exception):
        pass

    seen = []

    def stop_after_five(result):
        seen.append(result.index)
        if len(seen) == 5:
            raise Stop

    with pytest.raises(Stop):
        exhaust.run(plan(), tmp_path / "cut", on_result=stop_after_five)
    lines = (tmp_path / "cut" / exhaust.PROGRESS).read_text().splitlines()
    assert len(lines) == 1 + 5  # the plan, then five finished sequences
    resumed = []
    again = exhaust.run(plan(), tmp_path / "cut", on_result=lambda r: resumed.append(r.index))
    assert len(resumed) == 12 - 5 and not set(resumed) & set(seen)
    for key in ("sequences", "crash_states", "sequences_with_findings", "by_policy", "complete"):
        assert again[key] == whole[key], key


def test_a_progress_file_of_another_plan_is_refused(tmp_path):
    exhaust.run(plan(ops=1), tmp_path)
    with pytest.raises(exhaust.ExhaustError, match="different exhaust plan"):
        exhaust.run(plan(ops=2), tmp_path)


def test_shards_partition_the_sequence_space(tmp_path):
    full = plan(configs=tuple(exhaust.config_classes({})))
    everything = [i for i, _c, _s in full.items()]
    parts = [[i for i, _c, _s in plan(configs=full.configs, shard=(k, 3)).items()] for k in range(3)]
    assert sorted(sum(parts, [])) == everything == list(range(len(everything)))
    assert all(set(a).isdisjoint(b) for a in parts for b in parts if a is not b)

    whole = exhaust.run(plan(), tmp_path / "whole")
    shards = [exhaust.run(plan(shard=(k, 2)), tmp_path / f"s{k}") for k in range(2)]
    assert sum(s["sequences"] for s in shards) == whole["sequences"]
    assert sum(s["crash_states"] for s in shards) == whole["crash_states"]


def test_summary_states_what_was_covered(tmp_path):
    exhaust.run(plan(), tmp_path)
    data = json.loads((tmp_path / "exhaust.json").read_text())
    cov = data["covered"]
    assert cov["alphabet"] == "small" and cov["max_ops"] == 2 and cov["shard"] == "0/1"
    assert cov["policies"] == list(exhaust.BUDGET.policies)
    assert [c["config"] for c in cov["configs"]] == [str(c) for c in TINY]
    text = (tmp_path / "exhaust.md").read_text()
    assert "12/12 sequences" in text and "| L2 table allocated |" in text
    assert data["events_by_class"]["v3 cluster 512 B-1 KiB"]["L2 table allocated"]["reached"] > 0


def test_unknown_alphabet_is_a_named_error():
    with pytest.raises(exhaust.ExhaustError, match="unknown alphabet"):
        exhaust.alphabet("nope", TINY[0])


def test_cli_exit_status_follows_the_findings(tmp_path, injected, capsys):
    from harness.cli import main

    args = ["exhaust", "--ops", "1", "--alphabet", "small", "--config", "cluster_size=512", "-q"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert "3/3 sequences" in capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "b"), "--inject", "dirty-not-cleared"]) == 1
    assert main(["exhaust", "--ops", "0", "--out", str(tmp_path / "d")]) == 2


@pytest.mark.parametrize("name", sorted(exhaust.ALPHABETS))
def test_every_alphabet_is_valid_in_every_class(name):
    from harness.ops import validate_op

    for config in exhaust.config_classes({}) + exhaust.config_classes({"version": "2"}):
        letters = exhaust.alphabet(name, config)
        assert len(set(letters)) == len(letters) >= 3
        for op in letters:
            validate_op(op, config, f"{name} letter")


def test_an_empty_progress_file_starts_afresh(tmp_path):
    (tmp_path / exhaust.PROGRESS).write_text("")  # killed before the plan line was written
    assert exhaust.run(plan(ops=1), tmp_path)["sequences"] == 3


@pytest.mark.parametrize("bug,cluster_size,ops", [
    ("l2-crossing-write-one-table", "4096", 1),  # the write across the first L2-table boundary
    ("discard-tail-whole-cluster", "4096", 2),  # write the last cluster, then discard its last sector
    ("refblock-alloc-no-flush", "512", 1),  # the write from 0 long enough to need a new refcount block
])
def test_edge_alphabet_finds_each_edge_bug_where_its_geometry_has_the_edge(tmp_path, injected, bug, cluster_size, ops):
    # Accurate refcounts: with lazy ones a crash inside the block allocation leaves the dirty bit
    # set and the rebuild on open hides a block that never reached the disk.
    configs = tuple(exhaust.config_classes({"cluster_size": cluster_size, "lazy_refcounts": "off"}))
    edge = plan(alphabet="edge", configs=configs, ops=ops)
    assert exhaust.run(edge, tmp_path / "clean")["sequences_with_findings"] == 0
    found = exhaust.run(dataclasses.replace(edge, inject=(bug,)), tmp_path / "bug", first=True)
    assert found["sequences_with_findings"] >= 1, f"{bug} not found by the edge alphabet"
