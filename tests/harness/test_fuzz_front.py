"""Issue 13: the fuzz front end as nightly and CI owners use it: identity, budgets, option placement, merge, CI, reports."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.cli.options import parse_duration, parse_shard
from harness.cli import UsageError

ROOT = Path(__file__).resolve().parents[2]
BUG = "dirty-no-flush"
BUGCFG = "cluster_size=512,virtual_size=1048576,lazy_refcounts=on,version=3"
SMALL = "cluster_size=512,virtual_size=1048576"


def qcrash(*args: str, env: dict | None = None, cwd: Path = ROOT, timeout: float = 300,
           stdin: str | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT)}
    full.pop("QCRASH_INJECT", None)
    full.pop("GITHUB_STEP_SUMMARY", None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=cwd,
                          env=full, timeout=timeout, input=stdin)


def findings(report: Path) -> list[dict]:
    return json.loads((report / "summary.json").read_text())["findings"]


@pytest.fixture(scope="module")
def bug_run(tmp_path_factory) -> Path:
    """One shrunk run with an injected bug that gives two signatures, one of them hit twice (seed 2, 16 examples)."""
    report = tmp_path_factory.mktemp("bug") / "r"
    proc = qcrash("fuzz", "--inject", BUG, "--examples", "16", "--seed", "2", "--config", BUGCFG,
                  "--report", str(report), "--junit", str(report / "junit.xml"),
                  env={"GITHUB_STEP_SUMMARY": str(report.parent / "step-summary.md")})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return report


# ---------------------------------------------------------------------------------------- identity
def test_each_signature_has_one_file_named_after_it(bug_run: Path) -> None:
    fs = findings(bug_run)
    assert len(fs) >= 2, fs
    files = sorted((bug_run / "findings").glob("*.json"))
    assert len(files) == len(fs) == len({f["signature"] for f in fs})
    for f in fs:
        data = json.loads((bug_run / f["file"]).read_text())
        # The file name, the summary and the shrunk finding inside the file all name one signature.
        assert data["signature"] == f["signature"]
        assert hashlib.sha1(f["signature"].encode()).hexdigest()[:12] in f["file"]
    assert sum(f["count"] for f in fs) > len(fs), "the run should hit one signature twice"


def test_duplicates_are_dropped_before_shrinking_and_shrinking_keeps_the_signature(tmp_path: Path, monkeypatch) -> None:
    from harness.fuzz import engine as fz
    from models.qcow2 import inject

    calls = []
    real = fz.shrink_reproducer

    def counting(rep, seconds, stop=lambda: False):
        small = real(rep, seconds, stop)
        calls.append((rep.signature, small.signature))
        return small

    monkeypatch.setattr(fz, "shrink_reproducer", counting)
    opts = fz.FuzzOptions(examples=16, seed=2, overrides=dict(kv.split("=") for kv in BUGCFG.split(",")),
                          corpus=tmp_path, inject=[BUG])
    try:
        result = fz.fuzz(opts)
    finally:
        inject.set_active([])
    assert sum(result.counts.values()) > len(result.counts) >= 2
    assert len(calls) == len(result.counts), "each signature is shrunk once, duplicates never"
    assert all(before == after for before, after in calls), calls


def test_a_shrink_that_slips_to_another_failure_is_rejected(monkeypatch) -> None:
    from harness import shrink as sh
    from harness.config import Config
    from harness.ops import Write
    from harness.oracle import Finding, Verdict
    from harness.runner import Budget

    target = Finding(Verdict.DATA_LOST, "r", "e", 1, "raw", None, "subsets", None, "Write")
    other = Finding(Verdict.DATA_LOST, "r", "e", 0, "raw", None, "torn", None, "Write")  # same verdict, other failure

    class FakeRunner:
        def __init__(self, *a, **k) -> None:
            pass

        def run(self, ops):
            return [target] if ops == original else [other]

    monkeypatch.setattr(sh, "Runner", FakeRunner)
    ops = original = [Write(0, 512), Write(512, 512)]
    best, _budget, found = sh.shrink(Config(), ops, 0, Budget(), target, seconds=5)
    assert best == ops and found.signature() == target.signature()


def test_known_matches_after_shrinking(tmp_path: Path) -> None:
    args = ["fuzz", "--inject", BUG, "--examples", "6", "--seed", "2", "--config", BUGCFG]
    first = qcrash(*args, "--corpus", str(tmp_path / "shared"), "--report", str(tmp_path / "r1"))
    assert first.returncode == 1, first.stderr
    second = qcrash(*args, "--known", str(tmp_path / "shared"), "--report", str(tmp_path / "r2"))
    assert second.returncode == 0, second.stdout + second.stderr
    s = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert s["known_failures_seen"] and not list((tmp_path / "r2").glob("findings/*.json"))
    assert [f["status"] for f in s["findings"]] == ["known"] * len(s["findings"])


def test_worker_processes_keep_one_identity_and_the_evidence(tmp_path: Path) -> None:
    proc = qcrash("fuzz", "--jobs", "2", "--inject", BUG, "--examples", "16", "--seed", "2", "--config", BUGCFG,
                  "--report", str(tmp_path / "r"))
    assert proc.returncode == 1, proc.stderr
    fs = findings(tmp_path / "r")
    assert len(fs) >= 2 and sum(f["count"] for f in fs) > len(fs)
    for f in fs:
        path = tmp_path / "r" / f["file"]
        assert json.loads(path.read_text())["signature"] == f["signature"]
        assert path.with_suffix(".qcow2").exists() and path.with_suffix(".ops.txt").exists()


# ---------------------------------------------------------------------------------------- budgets
def test_time_budget_includes_shrinking(tmp_path: Path) -> None:
    """--time is a hard limit: the run ends within the budget plus about one example's time, shrinking included."""
    proc = qcrash("fuzz", "--inject", BUG, "--time", "3s", "--seed", "2", "--config", BUGCFG, "--profile", "dev",
                  "--report", str(tmp_path / "r"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    # Without the fix the dev profile's 20 s of shrinking per signature comes on top.
    assert s["timing"]["seconds"] <= 3 + 2 * s["timing"]["longest_example_seconds"] + 1.5, s["timing"]


@pytest.mark.parametrize("args", [["--time", "0"], ["--time=-5s"], ["--time", "0s"], ["--examples", "0"],
                                  ["--examples=-3"], ["--max-findings", "0"]])
def test_zero_or_negative_budget_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    proc = qcrash("fuzz", *args, "--report", str(tmp_path / "r"))
    assert proc.returncode == 2 and "qcrash: error:" in proc.stderr and not (tmp_path / "r").exists(), proc.stderr


def test_durations() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration("90s") == 90 and parse_duration("2d") == 172800
    assert parse_duration("1.5h") == 5400 and parse_duration("45") == 45 and parse_duration("1m30s") == 90
    for bad in ("soon", "1h1h", "5x", "", "h"):
        with pytest.raises(UsageError):
            parse_duration(bad)


@pytest.mark.parametrize("flag", [["-x"], ["--exitfirst"], ["--max-findings", "1"]])
def test_exitfirst_stops_after_the_first_new_finding(tmp_path: Path, flag: list[str]) -> None:
    proc = qcrash("fuzz", *flag, "--inject", BUG, "--examples", "16", "--seed", "2", "--config", BUGCFG,
                  "--no-shrink", "--report", str(tmp_path / "r"))
    assert proc.returncode == 1, proc.stderr
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert len(s["findings"]) == 1 and s["examples"] < 16, (len(s["findings"]), s["examples"])


# ---------------------------------------------------------------------------------------- bug names
@pytest.mark.parametrize("command", [["fuzz", "--examples", "1"], ["zoo", "--budget", "1s"], ["bench", "--quick"],
                                     ["replay", "x.json"], ["shrink", "x.json"]])
def test_inject_after_the_subcommand_and_unknown_names_are_usage_errors(tmp_path: Path, command: list[str]) -> None:
    proc = qcrash(*command, "--inject", "no-such-bug", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unknown bug name(s) no-such-bug; known: " in proc.stderr and BUG in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [["img", "info", "x.qcow2"], ["fuzz", "--examples", "1"], ["zoo", "--list"]])
def test_qcrash_inject_typo_is_a_usage_error_everywhere(tmp_path: Path, command: list[str]) -> None:
    proc = qcrash(*command, env={"QCRASH_INJECT": "dirty-no-flsh"}, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "QCRASH_INJECT: unknown bug name(s) dirty-no-flsh; known: " in proc.stderr


def test_inject_on_the_subcommand_runs_with_the_bug(tmp_path: Path) -> None:
    proc = qcrash("fuzz", "--examples", "4", "--seed", "2", "--config", BUGCFG, "--no-shrink", "--inject", BUG,
                  "--report", str(tmp_path / "r"))
    assert proc.returncode == 1 and f"injected bugs: {BUG}" in proc.stdout, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------- shards and CI
@pytest.mark.parametrize("env, text, want", [
    ({"CI_NODE_INDEX": "1", "CI_NODE_TOTAL": "4"}, "auto", (0, 4)),  # GitLab counts from 1
    ({"CI_NODE_INDEX": "4", "CI_NODE_TOTAL": "4"}, "auto", (3, 4)),
    ({"CIRCLE_NODE_INDEX": "2", "CIRCLE_NODE_TOTAL": "3"}, "auto", (2, 3)),
    ({"BUILDKITE_PARALLEL_JOB": "0", "BUILDKITE_PARALLEL_JOB_COUNT": "5"}, "auto", (0, 5)),
    ({"JOB_COMPLETION_INDEX": "7"}, "auto/8", (7, 8)),  # Kubernetes indexed Job: total given
    ({}, "2/3", (2, 3)),
])
def test_shard_auto_reads_each_ci(env: dict, text: str, want: tuple[int, int]) -> None:
    assert parse_shard(text, env) == want


@pytest.mark.parametrize("env, text", [({}, "auto"), ({"CI_NODE_INDEX": "0", "CI_NODE_TOTAL": "2"}, "auto"),
                                       ({"JOB_COMPLETION_INDEX": "8"}, "auto/8"), ({}, "auto/4"),
                                       ({"CIRCLE_NODE_INDEX": "x", "CIRCLE_NODE_TOTAL": "2"}, "auto")])
def test_shard_auto_without_or_with_bad_variables_is_a_usage_error(env: dict, text: str) -> None:
    with pytest.raises(UsageError):
        parse_shard(text, env)


def test_shard_auto_in_a_gitlab_job(tmp_path: Path) -> None:
    proc = qcrash("fuzz", "--shard", "auto", "--examples", "1", "--seed", "3", "--config", SMALL,
                  "--report", str(tmp_path / "r"), env={"CI_NODE_INDEX": "2", "CI_NODE_TOTAL": "3"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["shard"] == [1, 3]


def test_junit_file_validates(bug_run: Path) -> None:
    root = ET.parse(bug_run / "junit.xml").getroot()
    fs = findings(bug_run)
    assert root.tag == "testsuites" and root.get("failures") == str(len(fs))
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert int(suite.get("tests")) == len(cases) == len(fs) + 1
    assert {c.get("name") for c in cases} == {"run"} | {f["signature"] for f in fs}
    for case in cases:
        assert set(case.attrib) <= {"name", "classname", "time"} and float(case.get("time")) >= 0
        failures = case.findall("failure")
        assert len(failures) == (0 if case.get("name") == "run" else 1)
        for failure in failures:
            assert failure.get("message") and "replay: qcrash replay" in failure.text


def test_github_step_summary_is_appended(bug_run: Path) -> None:
    text = (bug_run.parent / "step-summary.md").read_text()
    assert text.startswith("# qcrash fuzz report") and all(f["signature"] in text for f in findings(bug_run))


# ---------------------------------------------------------------------------------------- reports
def test_summary_md_tells_rule_evidence_replay_and_new_or_known(bug_run: Path) -> None:
    md = (bug_run / "summary.md").read_text()
    for f in findings(bug_run):
        section = md.split(f"### `{f['signature']}`", 1)[1].split("###", 1)[0]
        assert section.startswith(": new,")
        assert f"rule broken: {f['rule']}" in section and f"evidence: {f['evidence'][:40]}" in section
        assert f"replay (from this report's directory): `qcrash replay {f['file']}`" in section and "crash: crash after host op" in section


def test_summary_json_has_a_format_version_and_target(bug_run: Path) -> None:
    s = json.loads((bug_run / "summary.json").read_text())
    assert s["format"] == "qcrash-summary" and s["format_version"] == 2 and s["target"] == "python"


def test_files_are_created_with_the_normal_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        proc = qcrash("fuzz", "--inject", BUG, "--examples", "4", "--seed", "2", "--config", BUGCFG, "--no-shrink",
                      "--report", str(tmp_path / "r"))
    finally:
        os.umask(old)
    assert proc.returncode == 1
    made = [p for p in (tmp_path / "r").rglob("*") if p.is_file()]
    assert len(made) >= 6
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in made} == {"0o644"}


def test_plots_have_labelled_ticks_and_distinct_findings_as_steps(bug_run: Path) -> None:
    svg = (bug_run / "findings.svg").read_text()
    yticks = re.findall(r'class="ytick"[^>]*>([^<]+)<', svg)
    xticks = re.findall(r'class="xtick"[^>]*>([^<]+)<', svg)
    assert len(yticks) >= 3 and len(xticks) >= 3, (yticks, xticks)
    s = json.loads((bug_run / "summary.json").read_text())
    distinct = len(s["findings"])
    assert max(p["findings"] for p in s["throughput"]) == distinct < sum(f["count"] for f in s["findings"])
    (points,) = re.findall(r'class="series"[^>]*points="([^"]+)"', svg)
    pts = [tuple(map(float, p.split(","))) for p in points.split()]
    assert all(a[0] == b[0] or a[1] == b[1] for a, b in zip(pts, pts[1:])), "a step line moves across or up, never both"


def test_finding_keeps_crash_image_and_host_op_log_and_says_the_crash_in_words(bug_run: Path) -> None:
    for f in findings(bug_run):
        path = bug_run / f["file"]
        image, log = path.with_suffix(".qcow2"), path.with_suffix(".ops.txt")
        assert image.read_bytes()[:4] == b"QFI\xfb"
        lines = log.read_text().splitlines()
        assert "index" in lines[1] and "write site" in lines[1] and "offset" in lines[1] and "length" in lines[1]
        assert any(line.rstrip().endswith("lost") for line in lines) or any("torn" in line for line in lines)
        words = json.loads(path.read_text())["crash_state"]
        assert re.match(r"crash after host op \d+ \(.+ at 0x[0-9a-f]+\): unsynced", words), words
        check = qcrash("img", "check", str(image))
        assert check.returncode != 0, "the kept crash image shows the corruption to qemu-img check"


def test_python_snippet_reproduces_with_the_injected_bugs(bug_run: Path) -> None:
    snippet = json.loads((bug_run / findings(bug_run)[0]["file"]).read_text())["python"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("QCRASH_INJECT", None)
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "Finding(verdict=" in proc.stdout, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------- merge
def _shards(tmp: Path, seed: str = "2", bugs: str = BUG) -> list[Path]:
    out = []
    for i in (0, 1):
        report = tmp / f"seed{seed}-shard{i}"
        proc = qcrash("fuzz", "--inject", bugs, "--examples", "5", "--seed", seed, "--shard", f"{i}/2",
                      "--config", BUGCFG, "--no-shrink", "--report", str(report))
        assert proc.returncode in (0, 1), proc.stderr
        out.append(report)
    return out


def test_merge_refuses_a_shard_twice_and_other_runs_unless_forced(tmp_path: Path) -> None:
    a, b = _shards(tmp_path)
    other = _shards(tmp_path, seed="9")[1]
    for dirs, why in (([a, a], "given twice"), ([a, other], "seed differs"), ([a, b, other], "shard 1 is in both")):
        proc = qcrash("report", "merge", *map(str, dirs), "--out", str(tmp_path / "m"))
        assert proc.returncode == 2 and why in proc.stderr and "refusing to merge" in proc.stderr, proc.stderr
        assert not (tmp_path / "m").exists()
    forced = qcrash("report", "merge", str(a), str(other), "--force", "--out", str(tmp_path / "forced"))
    assert forced.returncode == 0 and "seed differs" in forced.stderr
    m = json.loads((tmp_path / "forced" / "summary.json").read_text())
    assert m["merge_problems"] and "merged despite" in (tmp_path / "forced" / "summary.md").read_text()


def test_merge_labels_missing_shards(tmp_path: Path) -> None:
    a, _b = _shards(tmp_path)
    proc = qcrash("report", "merge", str(a), "--out", str(tmp_path / "m"))
    assert proc.returncode == 0
    m = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert m["missing_shards"] == [1] and m["shard_label"] == "shard 0 of 2 (missing 1)"


# ---------------------------------------------------------------------------------------- CLI habits
def test_bare_qcrash_prints_help_and_version() -> None:
    proc = qcrash()
    assert proc.returncode == 0 and proc.stdout.startswith("usage: qcrash") and "exit status:" in proc.stdout
    version = qcrash("--version")
    assert version.returncode == 0 and re.fullmatch(r"qcrash \d+\.\d+\.\d+\n", version.stdout)


def _walk(parser):
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice, sub in action.choices.items():
                help_of = {a.dest: a.help for a in action._choices_actions}
                assert help_of.get(choice), f"subcommand {sub.prog} has no help"
                yield from _walk(sub)


def test_every_subcommand_and_argument_has_help_and_exit_codes_are_documented() -> None:
    from harness.cli import build_parser

    parsers = list(_walk(build_parser()))
    assert len(parsers) >= 12
    for p in parsers:
        for action in p._actions:
            assert action.help, f"{p.prog}: {action.option_strings or action.dest} has no help text"
    for command in ("fuzz", "replay", "zoo"):
        assert "130" in qcrash(command, "--help").stdout
    readme = (ROOT / "README.md").read_text()
    assert all(code in readme for code in ("130", "143")) and "Exit status" in readme


def test_quiet_and_verbose(tmp_path: Path) -> None:
    args = ["fuzz", "--examples", "2", "--seed", "1", "--config", SMALL]
    quiet = qcrash("-q", *args, "--report", str(tmp_path / "q"))
    verbose = qcrash(*args, "-v", "--report", str(tmp_path / "v"))
    assert quiet.returncode == verbose.returncode == 0
    assert "crash states" not in quiet.stderr and quiet.stderr == ""
    assert len(re.findall(r"^example \d+ \(seed", verbose.stdout, re.M)) == 2


def test_progress_line_refreshes_on_a_timer_and_shows_time_since_last_finding() -> None:
    import io
    import time

    from harness.fuzz.progress import Progress

    stream = io.StringIO()
    progress = Progress(10, None, stream, interval=0.02).start()
    progress.update(1, 50, 1)
    deadline = time.monotonic() + 30
    while stream.getvalue().count("\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # polling: lines must appear with no further update() calls
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3 and "1 findings (last 0s ago)" in lines[0]


def test_a_closed_pipe_is_no_traceback() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "harness", "zoo", "--list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()  # like `| head -0`: the reader is gone before qcrash writes its first line
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and proc.returncode == 141, (proc.returncode, err)


def test_errors_go_to_stderr(tmp_path: Path) -> None:
    proc = qcrash("replay", str(tmp_path / "missing.json"))
    assert proc.returncode == 2 and proc.stdout == "" and "missing.json: cannot read" in proc.stderr


def test_io_reads_commands_from_stdin_like_qemu_io(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    assert qcrash("img", "create", "-f", "qcow2", str(img), "1M").returncode == 0
    proc = qcrash("io", str(img), stdin="write -P 0x5a 0 512\nread -P 0x5a 0 512\nfrobnicate\n")
    assert proc.returncode == 1, "a bad line is reported and the status says so, as qemu-io does"
    assert "wrote 512/512 bytes at offset 0" in proc.stdout and "read 512/512 bytes at offset 0" in proc.stdout
    assert 'command "frobnicate" not found' in proc.stderr


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
@pytest.mark.parametrize("args", [["img", "create"], ["img", "check", "--output=xml", "x"], ["img", "info", "--bogus", "x"],
                                  ["io", "--bogus", "x"], ["io", "-t", "bogus", "-c", "flush", "x"]])
def test_img_and_io_usage_errors_exit_as_qemu_does(tmp_path: Path, args: list[str]) -> None:
    tool = ["qemu-img"] if args[0] == "img" else ["qemu-io"]
    theirs = subprocess.run(tool + args[1:], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    mine = qcrash(*args, cwd=tmp_path)
    assert mine.returncode == theirs.returncode == 1, (mine.stderr, theirs.stderr)


# ---------------------------------------------------------------------------------------- contract
def test_the_contract_ships_with_the_repository() -> None:
    contract = ROOT / "harness" / "CRASH-CONTRACT.md"
    assert contract.read_text().startswith("# The crash contract")
    assert "(harness/CRASH-CONTRACT.md)" in (ROOT / "README.md").read_text()
    assert "harness/CRASH-CONTRACT.md" in (ROOT / "harness" / "oracle.py").read_text()
    assert "../shared/" not in (ROOT / "README.md").read_text() + (ROOT / "harness" / "oracle.py").read_text()


# ---------------------------------------------------------------------------------------- the workflow, chained
def test_workflow_fuzz_replay_shrink_known_merge(tmp_path: Path) -> None:
    """fuzz with an injected bug -> finding file -> replay -> shrink -> --known -> merge of two shards."""
    shards = []
    for i in (0, 1):
        report = tmp_path / f"shard-{i}"
        proc = qcrash("fuzz", "--inject", BUG, "--examples", "8", "--seed", "2", "--shard", f"{i}/2",
                      "--config", BUGCFG, "--report", str(report))
        assert proc.returncode in (0, 1), proc.stderr
        shards.append(report)
    files = sorted(p for s in shards for p in (s / "findings").glob("*.json"))
    assert files, "the bug is found in at least one shard"
    replay = qcrash("replay", str(files[0]))
    assert replay.returncode == 1 and "still failing" in replay.stdout
    sig = json.loads(files[0].read_text())["signature"]
    assert f"signature {sig} (recorded {sig})" in replay.stdout
    small = qcrash("shrink", str(files[0]), "--time", "20s")
    assert small.returncode == 1, small.stderr
    smaller = files[0].with_suffix(".min.json")
    assert json.loads(smaller.read_text())["signature"] == sig and smaller.with_suffix(".qcow2").exists()
    known = tmp_path / "known"
    known.mkdir()
    shutil.copy(smaller, known / "a.json")
    # --known as a user types it, relative to where they stand: the report must still point at the file.
    again = qcrash("fuzz", "--inject", BUG, "--examples", "8", "--seed", "2", "--shard", "0/2", "--config", BUGCFG,
                   "--known", "known", "--report", "again", cwd=tmp_path)
    s = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert sig not in {f["signature"] for f in s["findings"] if f["status"] == "new"}
    if sig in {f["signature"] for f in findings(shards[0])}:
        assert s["known_failures_seen"].get(sig), s["known_failures_seen"]
        entry = next(f for f in s["findings"] if f["signature"] == sig)
        assert entry["status"] == "known" and (tmp_path / "again" / entry["file"]).resolve() == (known / "a.json").resolve()
        assert str((known / "a.json").resolve()) in again.stdout, again.stdout
    merged = tmp_path / "merged"
    proc = qcrash("report", "merge", *map(str, shards), "--out", str(merged))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((merged / "summary.json").read_text())
    assert m["shard_label"] == "shards 0,1 of 2 (all)" and set(m["throughput_by_shard"]) == {"0", "1"}
    for f in m["findings"]:
        assert (merged / f["file"]).exists() and (merged / f["file"]).with_suffix(".qcow2").exists()
    assert m["examples"] == sum(json.loads((s / "summary.json").read_text())["examples"] for s in shards)
    assert "shards 0,1 of 2" in (merged / "summary.md").read_text()
    assert (merged / "findings.svg").read_text().count('class="series"') == 2
