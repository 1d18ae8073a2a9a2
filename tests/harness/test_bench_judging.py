"""`qcrash bench`'s judging figures: summaries, ratios over common examples, goals (no timing asserted)."""

from __future__ import annotations

from harness.bench import judging


def row(index: int, states: int, cpu: float, rss_kib: int = 1024) -> dict:
    return {"index": index, "seed": 1000 + index, "states": states, "cpu": cpu, "wall": cpu * 2, "finding": None,
            "maxrss_kib": rss_kib}


def test_summary_has_rate_median_p99_slowest_seed_and_peak_rss() -> None:
    s = judging.summarise([row(0, 100, 0.1), row(1, 50, 1.0, 4096), row(2, 300, 0.2)], None)
    assert s["crash_states"] == 450 and s["states_per_second_per_core"] == round(450 / 1.3, 1)
    assert s["median_example_seconds"] == 0.2
    assert s["slowest_example_seed"] == 1001 and s["slowest_example_seconds"] == 1.0
    assert s["lowest_example_states_per_second"] == 50.0
    assert s["peak_worker_rss_mib"] == 4.0
    assert 0.2 < s["p99_example_seconds"] <= 1.0


def test_ratio_compares_only_examples_both_checkouts_finished() -> None:
    new = judging.summarise([row(0, 100, 0.1), row(1, 100, 10.0)], None)
    old = judging.summarise([row(0, 100, 0.2)], {"index": 1, "wall_so_far": 30.0})
    ratio = judging._ratio(new, old)
    # Over all its examples the new side is slower (200 / 10.1 s), but over example 0 it is twice as fast.
    assert ratio["common_examples"] == 1 and ratio["states_per_second_per_core"] == 2.0


def test_goals_flag_a_slow_example_an_unfinished_one_and_memory() -> None:
    slow = judging.summarise([row(0, 10, 0.5, 400 * 1024)], None)
    cells = [{"profile": "dev", "class": "mix", "new": slow}, {"profile": "dev", "class": "2MiB", "new": slow}]
    goals = judging.goals(cells)
    assert goals["dev mix"][">= 1000 states/s per core"] is False
    assert goals["dev mix"]["no example below 100 states/s"] is False
    assert goals["dev 2MiB"]["peak worker RSS <= 300 MiB"] is False
    fine = judging.summarise([row(0, 1000, 0.5)], None)
    assert all(judging.goals([{"profile": "dev", "class": "mix", "new": fine}])["dev mix"].values())


def test_recovery_crash_states_are_counted_beside_the_crash_states_not_in_them() -> None:
    rows = [dict(row(0, 100, 0.5), recovery_states=300), dict(row(1, 100, 0.5), recovery_states=100)]
    s = judging.summarise(rows, None)
    assert s["crash_states"] == 200 and s["states_per_second_per_core"] == 200.0
    assert s["recovery_crash_states"] == 400 and s["all_states_per_second_per_core"] == 600.0
    old = judging.summarise([row(0, 100, 0.5)], None)  # an older checkout's child reports no recovery states
    assert old["recovery_crash_states"] is None and old["all_states_per_second_per_core"] is None
    report = {"baseline": None, "seed": 7, "commit": "x", "cell_seconds": 1, "goals": {},
              "cells": [{"profile": "nightly", "class": "mix", "new": s}]}
    assert "| nightly | mix | 200 | 400 | 2.00 | 600.0 |" in judging.render(report)


def test_a_run_counts_the_crash_states_of_its_recoveries() -> None:
    from harness.fuzz.engine import run_example

    out = run_example((2, 7, {}, "nightly", [], False))  # (380 states, 162 of them deep)
    deep = out.stats.coverage["recovery crashed"]
    assert deep and out.stats.recovery_crash_states >= deep  # every deep state judged at least one crash of its recovery
    again = judging.summarise([{"index": 0, "seed": 1, "states": out.stats.crash_states, "cpu": 1.0, "wall": 1.0,
                                "finding": None, "maxrss_kib": 1, "recovery_states": out.stats.recovery_crash_states}],
                               None)
    assert again["recovery_crash_states"] == out.stats.recovery_crash_states


def test_measure_warms_up_each_side_and_alternates_which_runs_first(monkeypatch, tmp_path) -> None:
    # The first child of a run is slower (a cold machine): each checkout runs a thrown-away cell first,
    # and the side that runs first alternates from cell to cell, so neither side always pays for going first.
    calls: list[tuple[str, str, str, int]] = []

    def fake_cell(where, profile, overrides, *, seed, examples, seconds, python=None):
        calls.append((where.name, profile, overrides.get("cluster_size", "mix"), examples))
        return judging.summarise([row(0, 10, 0.1)], None)

    monkeypatch.setattr(judging, "run_cell", fake_cell)
    monkeypatch.setattr(judging, "_commit", lambda where: None)
    new, old = tmp_path / "new", tmp_path / "old"
    r = judging.measure(checkout=new, baseline=old, profiles={"dev": 3}, classes=("mix", "512B", "4KiB"))
    warm = judging.WARM_UP_EXAMPLES
    assert calls[:2] == [("new", "dev", "mix", warm), ("old", "dev", "mix", warm)]
    assert [c[0] for c in calls[2:]] == ["new", "old", "old", "new", "new", "old"]
    assert [c["order"] for c in r["cells"]] == [["new", "old"], ["old", "new"], ["new", "old"]]
    calls.clear()
    judging.measure(checkout=new, baseline=None, profiles={"dev": 3}, classes=("mix", "512B"))
    assert [c[0] for c in calls] == ["new", "new", "new"]  # (one warm-up, then the cells)
    report = judging.measure(checkout=new, baseline=old, profiles={"dev": 3}, classes=("mix",))
    assert "which one runs a cell first alternates" in "\n".join(judging.render(report))


def test_rounds_alternate_within_a_cell_and_report_the_median_round(monkeypatch, tmp_path) -> None:
    # A dev cell is about a CPU second and varied by 15% between runs of the same code: with rounds,
    # each side runs the cell N times, alternating, and the report takes the median round and ratio.
    calls: list[str] = []
    rates = {"new": iter([100.0, 400.0, 200.0]), "old": iter([100.0, 100.0, 400.0])}
    rss = {"new": iter([1, 5, 2]), "old": iter([1, 1, 1])}

    def fake_cell(where, profile, overrides, *, seed, examples, seconds, python=None):
        calls.append(where.name)
        if examples == judging.WARM_UP_EXAMPLES:
            return judging.summarise([row(0, 10, 0.1)], None)
        rate = next(rates[where.name])
        return judging.summarise([row(0, int(rate), 1.0, next(rss[where.name]) * 1024)], None)

    monkeypatch.setattr(judging, "run_cell", fake_cell)
    monkeypatch.setattr(judging, "_commit", lambda where: None)
    new, old = tmp_path / "new", tmp_path / "old"
    r = judging.measure(checkout=new, baseline=old, profiles={"dev": 3}, classes=("mix",), rounds=3)
    assert calls[2:] == ["new", "old", "old", "new", "new", "old"]
    cell = r["cells"][0]
    assert cell["new"]["states_per_second_per_core"] == 200.0  # the median round (the mean would be 233.3)
    assert cell["new"]["rounds_states_per_second"] == [100.0, 400.0, 200.0]
    assert cell["old"]["states_per_second_per_core"] == 100.0  # (mean 200: the outlier round does not count)
    assert cell["new"]["peak_worker_rss_mib"] == 5.0  # the highest round's
    ratio = cell["ratio_new_over_old"]
    assert ratio["rounds"] == [1.0, 4.0, 0.5] and ratio["states_per_second_per_core"] == 1.0
    assert ratio["range"] == [0.5, 4.0]
    text = "\n".join(judging.render(r))
    assert "3 rounds per checkout" in text and "| 1.0 (0.5-4.0) |" in text
    import pytest
    with pytest.raises(ValueError, match="rounds"):
        judging.measure(checkout=new, baseline=old, profiles={"dev": 1}, rounds=0)


def test_bench_refuses_fewer_than_one_round(capsys) -> None:
    from harness.cli import main

    assert main(["bench", "--judging-only", "--rounds", "0"]) == 2
    assert "--rounds 0: must be at least 1" in capsys.readouterr().out


def test_baseline_python_runs_the_old_side_with_that_interpreter(monkeypatch, tmp_path) -> None:
    # The interpreter is part of what a bench compares (README, Measuring): with baseline_python the
    # old side's cells, warm-up included, run under it, the new side's under this one, and the report names both.
    import sys

    seen: list[tuple[str, str | None]] = []

    def fake_cell(where, profile, overrides, *, seed, examples, seconds, python=None):
        seen.append((where.name, python))
        return judging.summarise([row(0, 10, 0.1)], None)

    monkeypatch.setattr(judging, "run_cell", fake_cell)
    monkeypatch.setattr(judging, "_commit", lambda where: None)
    other = sys.executable + "-other"
    monkeypatch.setattr(judging, "interpreter", lambda python: f"{python} (Python 3.11.x)")
    r = judging.measure(checkout=tmp_path / "new", baseline=tmp_path / "old", profiles={"dev": 1}, classes=("mix",),
                        baseline_python=other)
    assert sorted(set(seen)) == [("new", sys.executable), ("old", other)] and len(seen) == 4
    assert r["python"].startswith(sys.executable) and r["baseline_python"].startswith(other)
    assert f"interpreters: new {sys.executable} (Python 3.11.x), old {other}" in "\n".join(judging.render(r))
    seen.clear()
    r = judging.measure(checkout=tmp_path / "new", baseline=tmp_path / "old", profiles={"dev": 1}, classes=("mix",))
    assert {p for _w, p in seen} == {sys.executable} and "interpreters:" not in "\n".join(judging.render(r))


def test_interpreter_names_the_path_and_the_version_it_prints() -> None:
    import platform
    import sys

    assert judging.interpreter(sys.executable) == f"{sys.executable} (Python {platform.python_version()})"


def test_bench_refuses_a_baseline_python_that_is_not_there(capsys) -> None:
    from harness.cli import main

    assert main(["bench", "--judging-only", "--baseline-python", "/nonexistent/python3"]) == 2
    assert "--baseline-python /nonexistent/python3: no such interpreter" in capsys.readouterr().out


def test_dev_names_the_interpreter_it_makes_the_environment_from(tmp_path) -> None:
    # ./dev prefers a Python 3.11 that can make a venv (Debian's first: measured faster); QCRASH_PYTHON
    # overrides it, and one that is not there is refused by name before anything is made.
    import os
    import subprocess
    import sys
    from pathlib import Path

    dev = Path(__file__).resolve().parents[2] / "dev"
    env = dict(os.environ, QCRASH_PYTHON=sys.executable)
    got = subprocess.run([str(dev), "which-python"], capture_output=True, text=True, env=env)
    assert got.returncode == 0 and got.stdout.strip() == sys.executable
    env["QCRASH_PYTHON"] = str(tmp_path / "python3")
    got = subprocess.run([str(dev), "which-python"], capture_output=True, text=True, env=env)
    assert got.returncode == 2 and f"QCRASH_PYTHON={tmp_path / 'python3'}: not a Python 3.11" in got.stderr
    env.pop("QCRASH_PYTHON")
    chosen = subprocess.run([str(dev), "which-python"], capture_output=True, text=True, env=env).stdout.strip()
    version = subprocess.run([chosen, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
    assert version.stdout.strip() == "(3, 11)"


def test_bench_with_only_a_baseline_python_compares_this_checkout_under_both(monkeypatch, tmp_path) -> None:
    import shutil
    import sys
    from pathlib import Path

    from harness.bench import throughput
    from harness.cli import main

    asked: dict = {}

    def fake_run(**kw):
        asked.update(kw)
        return tmp_path

    monkeypatch.setattr(throughput, "run", fake_run)
    assert main(["bench", "--judging-only", "--baseline-python", sys.executable]) == 0
    assert asked["baseline"] == Path(judging.__file__).resolve().parents[2]  # (this checkout)
    assert asked["baseline_python"] == shutil.which(sys.executable)


def test_bench_refuses_a_baseline_python_without_the_projects_dependencies(capsys, tmp_path) -> None:
    # A bare interpreter (no numpy, xxhash, ...) would fail in the first child with a traceback;
    # it is refused before anything runs, with the import that failed and what to do instead.
    import subprocess
    import sys

    from harness.cli import main

    assert judging.interpreter_problem(sys.executable) is None
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    bare = str(tmp_path / "bare" / "bin" / "python")
    assert "No module named" in judging.interpreter_problem(bare)
    assert main(["bench", "--judging-only", "--baseline-python", bare]) == 2
    out = capsys.readouterr().out
    assert f"--baseline-python {bare}: cannot run a bench cell: ModuleNotFoundError: No module named" in out
    assert "the project's dependencies" in out


def test_a_mix_cell_says_which_geometries_took_its_cpu_time() -> None:
    def geo(index: int, states: int, cpu: float, bits: int, cluster: int) -> dict:
        return dict(row(index, states, cpu), refcount_bits=bits, cluster_size=cluster)

    rows = [geo(0, 100, 3.0, 64, 512), geo(1, 500, 0.5, 16, 65536), geo(2, 50, 1.0, 64, 512), row(3, 10, 0.5)]
    s = judging.summarise(rows, None)
    # (an older checkout's rows name no geometry: counted in the total, in no group)
    assert s["by_geometry"] == [
        {"refcount_bits": 16, "cluster_size": 65536, "examples": 1, "crash_states": 500, "cpu_seconds": 0.5,
         "cpu_share": 0.1, "states_per_second_per_core": 1000.0},
        {"refcount_bits": 64, "cluster_size": 512, "examples": 2, "crash_states": 150, "cpu_seconds": 4.0,
         "cpu_share": 0.8, "states_per_second_per_core": 37.5}]
    report = {"baseline": None, "seed": 7, "commit": "x", "cell_seconds": 1, "goals": {},
              "cells": [{"profile": "dev", "class": "mix", "new": s}, {"profile": "dev", "class": "512B", "new": s}]}
    text = judging.render(report)
    first = text.index("| dev | 64 | 512 | 2 | 150 | 4.0 | 80.0% | 37.5 |")
    assert text.index("| dev | 16 | 65536 | 1 | 500 | 0.5 | 10.0% | 1000.0 |") == first + 1  # largest share first
    assert sum(line.startswith("| dev | 64 | 512 |") for line in text) == 1  # mix cells only


def test_the_bench_child_reports_each_examples_geometry(tmp_path) -> None:
    cell = judging.run_cell(__import__("pathlib").Path(__file__).resolve().parents[2], "dev", {"cluster_size": "4096"},
                            seed=7, examples=1, seconds=120)
    (only,) = cell["rows"]
    assert only["cluster_size"] == 4096 and only["refcount_bits"] in (1, 2, 4, 8, 16, 32, 64)
    assert cell["by_geometry"][0]["examples"] == 1
