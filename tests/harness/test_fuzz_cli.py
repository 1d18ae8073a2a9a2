"""The fuzz front end as a user runs it: determinism, shards, reproducer files, replay, corpora, kill -9, bad files."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = "cluster_size=512,virtual_size=1048576"
TIMING_KEYS = {"timing", "throughput", "command"}


def qcrash(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("QCRASH_INJECT", None) if env is None or "QCRASH_INJECT" not in env else None
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=ROOT,
                          env=full_env, timeout=timeout)


def _first_line(stream, wanted, seconds: float) -> str | None:
    """The first line of `stream` that `wanted` accepts, read in a thread so a silent child cannot hang the test."""
    found: queue.Queue = queue.Queue()

    def read() -> None:
        for line in stream:
            if wanted(line):
                found.put(line)
                return
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        return found.get(timeout=seconds)
    except queue.Empty:
        return None


def summary(report: Path) -> dict:
    data = json.loads((report / "summary.json").read_text())
    return {k: v for k, v in data.items() if k not in TIMING_KEYS}


def test_same_seed_gives_identical_summaries(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        proc = qcrash("fuzz", "--examples", "8", "--seed", "1", "--config", SMALL, "--report", str(tmp_path / name))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "seed 1" in proc.stdout
        runs.append(summary(tmp_path / name))
    assert runs[0] == runs[1]
    assert runs[0]["examples"] == 8 and runs[0]["crash_states"] > 0
    assert (tmp_path / "a" / "summary.md").read_text().startswith("# qcrash fuzz report")
    assert (tmp_path / "a" / "throughput.svg").read_text().startswith("<svg")


def test_shards_do_not_overlap_and_merge_adds_up(tmp_path: Path) -> None:
    reports = []
    for shard in ("0/2", "1/2"):
        out = tmp_path / shard.replace("/", "of")
        proc = qcrash("fuzz", "--examples", "5", "--seed", "3", "--shard", shard, "--config", SMALL, "--report", str(out))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        reports.append(out)
    s0, s1 = (json.loads((r / "summary.json").read_text()) for r in reports)
    assert s0["example_seeds_digest"] != s1["example_seeds_digest"]
    merged = tmp_path / "merged"
    proc = qcrash("report", "merge", str(reports[0]), str(reports[1]), "--out", str(merged))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((merged / "summary.json").read_text())
    for key in ("examples", "ops", "crash_states", "recovery_crash_states"):
        assert m[key] == s0[key] + s1[key]
    for policy, count in m["crash_states_by_policy"].items():
        assert count == s0["crash_states_by_policy"].get(policy, 0) + s1["crash_states_by_policy"].get(policy, 0)


def test_injected_bug_gives_one_reproducer_that_replays(tmp_path: Path) -> None:
    report = tmp_path / "r"
    proc = qcrash("--inject", "dirty-no-flush", "fuzz", "--examples", "6", "--seed", "2",
                  "--config", SMALL + ",lazy_refcounts=on,version=3", "--report", str(report))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    files = sorted((report / "findings").glob("*.json"))
    assert len(files) >= 1
    sigs = [json.loads(f.read_text())["signature"] for f in files]
    assert len(sigs) == len(set(sigs)), "one file per signature"
    counts = sum(json.loads(f.read_text())["count"] for f in files)
    assert counts >= len(files)
    rep = files[0]
    # The file records the bug, so replay reproduces it with no environment at all.
    again = qcrash("replay", str(rep))
    assert again.returncode == 1 and "still failing" in again.stdout, again.stdout + again.stderr
    recorded = json.loads(rep.read_text())
    assert recorded["signature"].split("@")[0] in again.stdout
    # With the bug switched off (the file edited as a user would after the fix), replay says fixed.
    data = json.loads(rep.read_text())
    data["inject"] = []
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps(data))
    proc = qcrash("replay", str(fixed))
    assert proc.returncode == 0 and "fixed" in proc.stdout, proc.stdout + proc.stderr
    # Dropped into a corpora directory, pytest collects it and it passes (bug caught when on, clean when off).
    corpus = tmp_path / "corpora"
    corpus.mkdir()
    shutil.copy(ROOT / "corpora" / "conftest.py", corpus / "conftest.py")
    shutil.copy(rep, corpus / rep.name)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(corpus)],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr


def test_bad_reproducer_files_are_named_and_others_still_replay(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    proc = qcrash("--inject", "dirty-no-flush", "fuzz", "--examples", "4", "--seed", "2", "--no-shrink",
                  "--config", SMALL + ",lazy_refcounts=on,version=3", "--corpus", str(tmp_path / "f"),
                  "--report", str(tmp_path / "r"))
    assert proc.returncode == 1
    shutil.copy(next((tmp_path / "f").glob("*.json")), good)
    bad_version = json.loads(good.read_text())
    bad_version["format_version"] = 99
    (tmp_path / "version.json").write_text(json.dumps(bad_version))
    bad_op = json.loads(good.read_text())
    bad_op["ops"][0] = {"op": "Write", "offset": "zero", "length": 512}
    (tmp_path / "op.json").write_text(json.dumps(bad_op))
    (tmp_path / "junk.json").write_text("{not json")
    proc = qcrash("replay", str(tmp_path / "version.json"), str(tmp_path / "op.json"), str(tmp_path / "junk.json"),
                  str(good))
    out, err = proc.stdout, proc.stderr
    assert "version.json: field 'format_version' = 99" in err
    assert "op.json: field 'ops[0].offset' = 'zero': must be a whole number (Write.offset)" in err
    assert "junk.json: line 1 column 2: not JSON" in err
    assert "good.json: still failing" in out and "Traceback" not in err
    assert proc.returncode == 1


def test_kill_9_keeps_findings_already_made(tmp_path: Path) -> None:
    corpus = tmp_path / "findings"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "harness", "--inject", "dirty-no-flush", "fuzz", "--time", "5m",
                             "--seed", "4", "--no-shrink", "--config", SMALL + ",lazy_refcounts=on,version=3",
                             "--corpus", str(corpus), "--report", str(tmp_path / "r")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(corpus.glob("*.json")):
            time.sleep(0.2)
        assert list(corpus.glob("*.json")), "no finding within two minutes"
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    files = list(corpus.glob("*.json"))
    assert files and all(json.loads(f.read_text())["format"] == "qcrash-reproducer" for f in files)
    assert not list(corpus.glob(".*")), "no half-written temporary files are left visible as findings"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in (["fuzz", "--shard", "3/2"], ["fuzz", "--config", "cluster_size=1000"], ["fuzz", "--time", "soon"],
                 ["--inject", "no-such-bug", "fuzz"]):
        proc = qcrash(*args, "--report", str(tmp_path / "x")) if args[0] == "fuzz" else qcrash(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "error" in proc.stderr


def test_known_failures_are_counted_not_recorded_again(tmp_path: Path) -> None:
    args = ["--inject", "dirty-no-flush", "fuzz", "--examples", "6", "--seed", "2", "--no-shrink",
            "--config", SMALL + ",lazy_refcounts=on,version=3"]
    first = qcrash(*args, "--corpus", str(tmp_path / "shared"), "--report", str(tmp_path / "r1"))
    assert first.returncode == 1
    second = qcrash(*args, "--known", str(tmp_path / "shared"), "--corpus", str(tmp_path / "own"),
                    "--report", str(tmp_path / "r2"))
    assert "known:" in second.stdout and "still failing" in second.stdout
    s = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert s["known_failures_seen"], s
    recorded_first = {json.loads(f.read_text())["signature"] for f in (tmp_path / "shared").glob("*.json")}
    recorded_second = {json.loads(f.read_text())["signature"] for f in (tmp_path / "own").glob("*.json")}
    assert not recorded_first & recorded_second, "a known signature was recorded again"


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_writes_a_partial_report_and_exits_128_plus_signal(tmp_path: Path, signum: int, status: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("QCRASH_INJECT", None)
    report = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "harness", "fuzz", "-v", "--time", "5m", "--seed", "6",
                             "--config", SMALL, "--report", str(report)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Poll: wait for the first example's line (-v), then signal; no fixed sleep.
        for line in proc.stdout:
            if line.startswith("example "):
                break
        proc.send_signal(signum)
        rest, _err = proc.communicate(timeout=120)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == status, rest
    s = json.loads((report / "summary.json").read_text())
    assert s["interrupted"] is True and s["examples"] >= 1 and s["signal"] == signum
    assert ("interrupted by SIGINT" if signum == signal.SIGINT else "stopped by SIGTERM") in rest
    assert "interrupted (partial report)" in (report / "summary.md").read_text()


def test_time_budget_ends_the_run_with_jobs(tmp_path: Path) -> None:
    """With worker processes, the run stops near its budget even when examples are still running."""
    t0 = time.monotonic()
    proc = qcrash("fuzz", "--time", "6s", "--jobs", "2", "--seed", "8", "--report", str(tmp_path / "r"), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 60
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["examples"] >= 1 and s["jobs"] == 2


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "qcrash").exists(), reason="./dev has not set up .venv here")
def test_dev_runs_qcrash_where_it_is_called_so_relative_paths_mean_what_they_say(tmp_path: Path) -> None:
    """`../dev qcrash ...` from another directory: the report, --known and replay paths are relative to that directory."""
    here = tmp_path / "work"
    here.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("QCRASH_INJECT", "PYTHONPATH")}

    def dev(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "dev"), "qcrash", *args], capture_output=True, text=True, cwd=here,
                              env=env, timeout=300)

    bug = ["--inject", "dirty-no-flush", "fuzz", "--examples", "6", "--seed", "2", "--no-shrink",
           "--config", SMALL + ",lazy_refcounts=on,version=3"]
    first = dev(*bug, "--report", "r1")
    assert first.returncode == 1, first.stdout + first.stderr
    files = sorted((here / "r1" / "findings").glob("*.json"))
    assert files, "the report was not made in the directory ./dev was called from"
    again = dev("replay", str(files[0].relative_to(here)))
    assert again.returncode == 1 and "still failing" in again.stdout, again.stdout + again.stderr
    second = dev(*bug, "--known", "r1/findings", "--report", "r2")
    assert "known:" in second.stdout, second.stdout + second.stderr
    assert json.loads((here / "r2" / "summary.json").read_text())["known_failures_seen"]
