"""`qcrash bench`'s judging figures: crash states judged per second per core, per profile and cluster-size class, optionally against an older checkout.

Each cell (checkout, profile, cluster-size class) runs seeded examples in a fresh child
process, one example after another, and streams one JSON line per finished example:
its crash states, CPU seconds, wall seconds and the child's peak RSS so far. CPU time
is what "per core" means here: the machine may be shared, and CPU seconds of a
single-threaded child do not count the time other processes held the core. A cell ends
after its examples or at its time limit; an example still running then is reported as
unfinished with the time it had had (so an old checkout's 12-minute example cannot stall
the run, and still shows). With `baseline`, every cell runs on both checkouts side by
side, alternating, and the report gives new/old ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLASSES: dict[str, dict[str, str]] = {
    "mix": {},
    "512B": {"cluster_size": "512"},
    "4KiB": {"cluster_size": "4096"},
    "64KiB": {"cluster_size": "65536"},
    "2MiB": {"cluster_size": "2097152"},
}
GOALS = {"dev": 1000.0, "nightly": 300.0}  # states/s per core on the mix
EXAMPLE_FLOOR, EXAMPLE_CEILING = 100.0, 60.0  # no example below 100 states/s or above 60 s
# A short cell run and thrown away on each checkout before the first measured one: the first child of
# a run started on a cold machine (page cache, clock) and took 3.28 CPU s for the dev mix that the same
# checkout judged in 3.06 s one cell later, and the new checkout, always first, read 0.84x of the old.
WARM_UP, WARM_UP_EXAMPLES = ("dev", {}), 5

# Runs inside the checkout being measured; works on checkouts before and after harness/fuzz/ became a package.
_CHILD = r"""
import json, resource, sys, time
try:
    from harness.fuzz.engine import run_example
except ImportError:
    from harness.fuzz import run_example
profile, seed, examples, overrides = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
for i in range(examples):
    c0, w0 = time.process_time(), time.perf_counter()
    out = run_example((i, seed, overrides, profile, [], False))
    print(json.dumps({"index": i, "seed": out.example_seed, "states": out.stats.crash_states,
                      "recovery_states": getattr(out.stats, "recovery_crash_states", None),
                      "cpu": time.process_time() - c0, "wall": time.perf_counter() - w0,
                      "finding": out.finding.verdict.value if out.finding else None,
                      "cluster_size": getattr(out.config, "cluster_size", None),
                      "refcount_bits": getattr(out.config, "refcount_bits", None),
                      "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), flush=True)
"""


def run_cell(checkout: Path, profile: str, overrides: dict[str, str], *, seed: int, examples: int,
             seconds: float, python: str | None = None) -> dict:
    """One cell in a child process in `checkout` (run by `python`, default this interpreter); its examples,
    summary figures and peak RSS."""
    env = dict(os.environ, PYTHONPATH=str(checkout), QCRASH_INJECT="")
    proc = subprocess.Popen([python or sys.executable, "-c", _CHILD, profile, str(seed), str(examples), json.dumps(overrides)],
                            cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows: list[dict] = []
    started = time.perf_counter()
    unfinished = None
    try:
        for line in _lines_until(proc, started + seconds):
            rows.append(json.loads(line))
        if len(rows) < examples:
            unfinished = {"index": len(rows), "wall_so_far": round(time.perf_counter() - started
                                                                   - sum(r["wall"] for r in rows), 2)}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if proc.returncode not in (0, -9) and not rows:
        raise RuntimeError(f"bench cell {profile} {overrides} in {checkout}: {proc.stderr.read()[-2000:]}")
    return summarise(rows, unfinished)


def _lines_until(proc: subprocess.Popen, deadline: float):
    """The child's stdout lines until it exits or the deadline passes (select-free: a reader thread)."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            return
        if line is None:
            return
        if line.strip():
            yield line


def summarise(rows: list[dict], unfinished: dict | None) -> dict:
    states = sum(r["states"] for r in rows)
    cpu = sum(r["cpu"] for r in rows)
    times = sorted(r["cpu"] for r in rows)
    slowest = max(rows, key=lambda r: r["cpu"], default=None)
    rates = [r["states"] / r["cpu"] for r in rows if r["cpu"] > 0]
    # Crash states of the recoveries (older checkouts do not count them: None)
    recovery = None if any(r.get("recovery_states") is None for r in rows) else sum(r["recovery_states"] for r in rows)
    return {
        "examples": len(rows), "crash_states": states, "cpu_seconds": round(cpu, 3),
        "wall_seconds": round(sum(r["wall"] for r in rows), 3),
        "states_per_second_per_core": round(states / cpu, 1) if cpu else None,
        "recovery_crash_states": recovery,
        "all_states_per_second_per_core": round((states + recovery) / cpu, 1) if cpu and recovery is not None else None,
        "median_example_seconds": round(statistics.median(times), 3) if times else None,
        "p99_example_seconds": round(_percentile(times, 0.99), 3) if times else None,
        "slowest_example_seed": slowest["seed"] if slowest else None,
        "slowest_example_seconds": round(slowest["cpu"], 3) if slowest else None,
        "lowest_example_states_per_second": round(min(rates), 1) if rates else None,
        "peak_worker_rss_mib": round(max((r["maxrss_kib"] for r in rows), default=0) / 1024, 1),
        "unfinished": unfinished,
        "by_geometry": by_geometry(rows),
        "rows": rows,
    }


def by_geometry(rows: list[dict]) -> list[dict]:
    """Where a cell's CPU time went, by the examples' refcount width and cluster size (rows that name both).

    A mix's rate is dominated by its slowest configurations; this says which they are.
    (On the dev mix at seed 7, 11 of 40 examples had 64-bit refcounts and took 72% of its
    CPU time: 512-byte clusters with the widest refcounts are the edge geometry, whose fill
    grows the refcount table and leaves images of thousands of clusters.)
    """
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        if r.get("refcount_bits") is not None and r.get("cluster_size") is not None:
            groups.setdefault((r["refcount_bits"], r["cluster_size"]), []).append(r)
    total = sum(r["cpu"] for r in rows) or 1e-9
    out = []
    for (bits, cluster), members in sorted(groups.items()):
        cpu = sum(r["cpu"] for r in members)
        states = sum(r["states"] for r in members)
        out.append({"refcount_bits": bits, "cluster_size": cluster, "examples": len(members), "crash_states": states,
                    "cpu_seconds": round(cpu, 3), "cpu_share": round(cpu / total, 3),
                    "states_per_second_per_core": round(states / cpu, 1) if cpu else None})
    return out


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of ascending values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(*, checkout: Path, baseline: Path | None, profiles: dict[str, int], seed: int = 7,
            cell_seconds: float = 120.0, classes: tuple[str, ...] = tuple(CLASSES), rounds: int = 1,
            baseline_python: str | None = None, progress=lambda _line: None) -> dict:
    """Every (profile, class) cell on `checkout` and, alternating, on `baseline`; `profiles` maps profile -> examples.

    With `rounds` > 1 each cell runs that many times on each side, the sides alternating
    within the cell too, and a side's figures are those of its median round (by states/s;
    peak RSS is the highest of any round). A dev cell is about one CPU second and the same
    code varied by about 15% from run to run: one round cannot tell a 5% change from noise.
    The ratio is the median of the rounds' ratios, with their range beside it.
    `baseline_python` runs the baseline's cells with another interpreter (the same checkout
    under two interpreters, or an old checkout under the interpreter it was measured with).
    """
    if rounds < 1:
        raise ValueError(f"bench: rounds = {rounds}: must be at least 1")
    cells = []
    sides = [(label, where) for label, where in (("new", checkout), ("old", baseline)) if where is not None]
    pythons = {"new": sys.executable, "old": baseline_python or sys.executable}
    for label, where in sides:
        progress(f"bench judging: warming up on {label} ({where}, {pythons[label]})")
        run_cell(where, *WARM_UP, seed=seed, examples=WARM_UP_EXAMPLES, seconds=cell_seconds, python=pythons[label])
    for profile, examples in profiles.items():
        for name in classes:
            cell = {"profile": profile, "class": name, "examples_asked": examples}
            # Which checkout runs first alternates from cell to cell: a child that follows another
            # runs on a warmer machine, and a fixed order put that on one side of every ratio.
            runs: dict[str, list[dict]] = {label: [] for label, _where in sides}
            for r in range(rounds):
                order = sides if (len(cells) + r) % 2 == 0 else sides[::-1]
                if r == 0:
                    cell["order"] = [label for label, _where in order]
                for label, where in order:
                    progress(f"bench judging: {profile} {name} on {label} ({where})"
                             + (f", round {r + 1}/{rounds}" if rounds > 1 else ""))
                    runs[label].append(run_cell(where, profile, CLASSES[name], seed=seed, examples=examples,
                                                seconds=cell_seconds, python=pythons[label]))
            for label, results in runs.items():
                cell[label] = _median_round(results)
            if baseline is not None:
                cell["ratio_new_over_old"] = _ratio_of_rounds(runs["new"], runs["old"])
            cells.append(cell)
    return {"seed": seed, "cell_seconds": cell_seconds, "rounds": rounds, "checkout": str(checkout),
            "baseline": str(baseline) if baseline else None, "baseline_commit": _commit(baseline),
            "python": interpreter(pythons["new"]),
            "baseline_python": interpreter(pythons["old"]) if baseline is not None else None,
            "commit": _commit(checkout), "goals": goals(cells), "cells": cells,
            "note": "per core = crash states / CPU seconds of the single-threaded child; times per example are CPU seconds"}


def _median_round(results: list[dict]) -> dict:
    """The round with the median states/s (the lower middle of an even count); peak RSS of all rounds."""
    if len(results) == 1:
        return results[0]
    ranked = sorted(results, key=lambda s: s["states_per_second_per_core"] or 0.0)
    out = dict(ranked[(len(ranked) - 1) // 2])
    out["rounds_states_per_second"] = [s["states_per_second_per_core"] for s in results]
    out["peak_worker_rss_mib"] = max(s["peak_worker_rss_mib"] for s in results)
    return out


def _ratio_of_rounds(new: list[dict], old: list[dict]) -> dict:
    """`_ratio` of each round's pair; the median ratio, with every round's and their range."""
    per_round = [_ratio(a, b) for a, b in zip(new, old)]
    if len(per_round) == 1:
        return per_round[0]
    rates = [r["states_per_second_per_core"] for r in per_round if r["states_per_second_per_core"] is not None]
    out = dict(_ratio(_median_round(new), _median_round(old)))
    out["states_per_second_per_core"] = round(statistics.median(rates), 2) if rates else None
    out["rounds"] = [r["states_per_second_per_core"] for r in per_round]
    out["range"] = [min(rates), max(rates)] if rates else None
    return out


def _ratio(new: dict, old: dict) -> dict:
    def div(key: str) -> float | None:
        a, b = new.get(key), old.get(key)
        return round(a / b, 2) if a and b else None
    # Only examples both checkouts finished are compared: a slow example one side did not
    # finish would otherwise drop out of that side's rate and flatter it.
    both = {r["index"] for r in new["rows"]} & {r["index"] for r in old["rows"]}
    rate = [sum(r["states"] for r in rows if r["index"] in both) / max(1e-9, sum(r["cpu"] for r in rows if r["index"] in both))
            for rows in (new["rows"], old["rows"])]
    return {"states_per_second_per_core": round(rate[0] / rate[1], 2) if both and rate[1] else None,
            "common_examples": len(both),
            "median_example_seconds": div("median_example_seconds"),
            "peak_worker_rss_mib": div("peak_worker_rss_mib")}


def goals(cells: list[dict]) -> dict:
    """The issue's goals, judged on the new checkout's figures."""
    out = {}
    for cell in cells:
        new = cell.get("new")
        if not new or not new["examples"]:
            continue
        key = f"{cell['profile']} {cell['class']}"
        rate = new["states_per_second_per_core"] or 0
        ok = {"no example below 100 states/s": (new["lowest_example_states_per_second"] or 0) >= EXAMPLE_FLOOR,
              "no example above 60 s": (new["slowest_example_seconds"] or 0) <= EXAMPLE_CEILING
              and new["unfinished"] is None}
        if cell["class"] == "mix" and cell["profile"] in GOALS:
            ok[f">= {GOALS[cell['profile']]:g} states/s per core"] = rate >= GOALS[cell["profile"]]
        if cell["class"] == "2MiB":
            ok["peak worker RSS <= 300 MiB"] = new["peak_worker_rss_mib"] <= 300
        out[key] = ok
    return out


# What a bench child needs of its interpreter: the Python the project requires, and the
# dependencies it imports (a bare interpreter, pyenv's say, has none of them).
_CHILD_NEEDS = "import sys; assert sys.version_info >= (3, 11), sys.version; import numpy, xxhash, crc32c, crcmod"


def interpreter_problem(python: str) -> str | None:
    """Why `python` cannot run a bench cell (its last error line), or None when it can."""
    try:
        proc = subprocess.run([python, "-c", _CHILD_NEEDS], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot be run ({exc})"
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit status {proc.returncode}"
    return None


def interpreter(python: str) -> str:
    """An interpreter as the report names it: its path and the version it prints."""
    proc = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True)
    return f"{python} (Python {proc.stdout.strip() or '?'})"


def _commit(where: Path | None) -> str | None:
    if where is None:
        return None
    proc = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def render(r: dict) -> list[str]:
    """Markdown lines for bench.md."""
    base = r["baseline"] is not None
    lines = ["## Crash states judged per second per core (CPU time, one core)", "",
             f"seed {r['seed']}, commit {r['commit']}" + (f", baseline {r['baseline_commit']} ({r['baseline']})"
                                                       if base else "") + f", at most {r['cell_seconds']:g} s per cell"
             + (f"; each checkout first ran {WARM_UP_EXAMPLES} {WARM_UP[0]} examples (not counted), and which one "
                "runs a cell first alternates" if base else "")
             + (f"; interpreters: new {r['python']}, old {r['baseline_python']}"
                if base and r.get("baseline_python") and r.get("baseline_python") != r.get("python") else "")
             + (f"; each cell ran {r['rounds']} rounds per checkout, alternating: figures are the median round's, "
                "peak RSS the highest round's, and the speed-up is the median of the rounds' ratios (their range in "
                "brackets)" if r.get("rounds", 1) > 1 else ""), "",
             "| profile | class | examples | states | states/s/core | median s | p99 s | slowest seed (s) | "
             "lowest states/s | peak RSS MiB | unfinished |" + (" old states/s/core | old median s | old peak MiB | "
                                                               "old unfinished | speed-up |" if base else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|---|" if base else "")]
    for cell in r["cells"]:
        new = cell["new"]
        row = (f"| {cell['profile']} | {cell['class']} | {new['examples']} | {new['crash_states']} | "
               f"{new['states_per_second_per_core']} | {new['median_example_seconds']} | {new['p99_example_seconds']} | "
               f"{new['slowest_example_seed']} ({new['slowest_example_seconds']}) | "
               f"{new['lowest_example_states_per_second']} | {new['peak_worker_rss_mib']} | {_unf(new)} |")
        if base:
            old = cell["old"]
            row += (f" {old['states_per_second_per_core']} | {old['median_example_seconds']} | "
                    f"{old['peak_worker_rss_mib']} | {_unf(old)} | {_speedup(cell['ratio_new_over_old'])} |")
        lines.append(row)
    lines += ["", "Work per crash state on the new checkout: a deep state also crashes its own recovery at "
              "sampled points (the profile's recovery_every and recovery_points), and each of those crash states "
              "is recovered and judged again. They are not crash states of the workload and are not in the "
              "figures above; here they are counted beside them.", "",
              "| profile | class | crash states | recovery crash states | per crash state | all judged states/s/core |",
              "|---|---|---|---|---|---|"]
    for cell in r["cells"]:
        new = cell["new"]
        extra = new.get("recovery_crash_states")
        if extra is None or not new["crash_states"]:
            continue
        lines.append(f"| {cell['profile']} | {cell['class']} | {new['crash_states']} | {extra} | "
                     f"{extra / new['crash_states']:.2f} | {new['all_states_per_second_per_core']} |")
    lines += _geometry_lines(r["cells"])
    lines += ["", "Goals on the new checkout:", ""]
    for key, ok in r["goals"].items():
        lines.append(f"- {key}: " + ", ".join(f"{name} {'yes' if v else 'NO'}" for name, v in ok.items()))
    return lines


def _geometry_lines(cells: list[dict]) -> list[str]:
    """Each mix cell's CPU time by refcount width and cluster size, on the new checkout (largest share first)."""
    mixes = [c for c in cells if c["class"] == "mix" and c["new"].get("by_geometry")]
    if not mixes:
        return []
    lines = ["", "Where each mix's CPU time went on the new checkout, by the examples' refcount width and cluster "
             "size (largest share first):", "",
             "| profile | refcount bits | cluster size | examples | crash states | CPU s | share of CPU | states/s/core |",
             "|---|---|---|---|---|---|---|---|"]
    for cell in mixes:
        for g in sorted(cell["new"]["by_geometry"], key=lambda g: -g["cpu_seconds"]):
            lines.append(f"| {cell['profile']} | {g['refcount_bits']} | {g['cluster_size']} | {g['examples']} | "
                         f"{g['crash_states']} | {g['cpu_seconds']} | {g['cpu_share'] * 100:.1f}% | "
                         f"{g['states_per_second_per_core']} |")
    return lines


def _unf(s: dict) -> str:
    u = s["unfinished"]
    return f"example {u['index']} after {u['wall_so_far']} s wall" if u else "-"


def _speedup(ratio: dict) -> str:
    spread = ratio.get("range")
    return f"{ratio['states_per_second_per_core']}" + (f" ({spread[0]}-{spread[1]})" if spread else "")
