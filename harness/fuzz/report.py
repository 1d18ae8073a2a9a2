"""Run reports: summary.json (data, versioned) and summary.md with SVG plots (for the people who fix the bugs)."""

from __future__ import annotations

import datetime as dt
import json
import platform
from collections import Counter
from pathlib import Path

from harness import __version__, coverage
from harness.snapshots import CRASH_COVERAGE, OP_COVERAGE
from harness.fuzz import plots
from harness.fuzz.corpus import atomic_write, atomic_write_json
from harness.oracle import digest

# Recovery situations a night should reach; a report says which it never reached.
COVERAGE_KEYS = (
    "dirty at open", "clean at open", "repaired on open", "refcount rebuild", "leaks after crash", "leaks repaired",
    "recovery crashed", "refcount-table growth crashed", "torn metadata write", "dirty-bit write unsynced",
    *OP_COVERAGE, *CRASH_COVERAGE,
)
SUMMARY_FORMAT = "qcrash-summary"
SUMMARY_VERSION = 2  # 2: format fields, target, finding details with report-relative files, shard timelines


def utc_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def build_summary(result, opts, *, argv: list[str], report_dir: Path | None = None) -> dict:
    stats = result.stats
    per_verdict = Counter()
    findings = []
    for sig, path in sorted(result.findings.items()):
        per_verdict[sig.split("@", 1)[0]] += result.counts[sig]
        findings.append(_finding_entry(sig, result.counts[sig], Path(path), report_dir, "new",
                                       result.found_at.get(sig)))
    known = getattr(opts, "known", {}) or {}
    for sig, hits in sorted(getattr(result, "known_hits", {}).items()):
        path = known.get(sig) if isinstance(known, dict) else None
        findings.append(_finding_entry(sig, hits, Path(path) if path else None, report_dir, "known", None))
    seconds = max(result.seconds, 1e-9)
    return {
        "format": SUMMARY_FORMAT,
        "format_version": SUMMARY_VERSION,
        "harness_version": __version__,
        "command": argv,
        "seed": opts.seed,
        "shard": list(opts.shard),
        "shards_held": [opts.shard[0]],
        "profile": opts.profile,
        "target": getattr(opts, "target", "python"),
        "config_overrides": opts.overrides,
        "inject": opts.inject,
        "jobs": opts.jobs,
        "python": platform.python_version(),
        "interrupted": result.interrupted,
        "signal": int(result.signal) if getattr(result, "signal", None) else None,
        "examples": len(result.outcomes),
        "unfinished_examples": getattr(result, "unfinished", 0),
        "example_seeds_digest": digest([o.example_seed for o in result.outcomes]),
        "configs": dict(Counter(_config_key(o.config) for o in result.outcomes)),
        "ops": stats.ops,
        "crash_states": stats.crash_states,
        "crash_states_by_policy": dict(sorted(stats.by_policy.items())),
        # Crash states of the recoveries of deep crash states, judged beside them (not crash states of the workload).
        "recovery_crash_states": stats.recovery_crash_states,
        # Error points (harness.errorpoints): examples swept for failed host operations, and runs judged.
        "error_examples": sum(1 for o in result.outcomes if getattr(o, "error_points", 0)),
        "error_points_judged": sum(getattr(o, "error_points", 0) for o in result.outcomes),
        "crash_points_by_site": dict(sorted(stats.by_site.items())),
        "coverage": {k: stats.coverage.get(k, 0) for k in COVERAGE_KEYS},
        **structural_events(stats.events),
        "verdicts": dict(sorted(per_verdict.items())),
        "findings": findings,
        "known_failures_seen": dict(sorted(getattr(result, "known_hits", {}).items())),
        "timing": {"seconds": round(result.seconds, 3),
                   "longest_example_seconds": round(max((o.seconds for o in result.outcomes), default=0.0), 3),
                   "phase_seconds": {k: round(v, 3) for k, v in sorted(stats.phase_seconds.items())},
                   "crash_states_per_second": round(stats.crash_states / seconds, 2),
                   "examples_per_second": round(len(result.outcomes) / seconds, 3)},
        "throughput": [{"t": t, "examples": e, "crash_states": c, "findings": f} for t, e, c, f in result.timeline],
    }


# ---- structural events (harness.coverage): reached and crashed inside, per configuration class


def structural_events(events: dict[str, int]) -> dict:
    """The summary's two event fields: the flat counts (what `qcrash report --merge` adds up) and the table they make."""
    flat = dict(sorted(events.items()))
    return {"structural_events": flat, "structural_events_by_class": coverage.table(flat)}


def _finding_entry(sig: str, count: int, path: Path | None, report_dir: Path | None, status: str,
                   found_at: float | None) -> dict:
    """One finding for summary.json: identity, hits, new or known, and what a person needs (rule, evidence, replay)."""
    entry = {"signature": sig, "status": status, "count": count, "found_at": found_at,
             "file": relative(path, report_dir) if path else None,
             "verdict": sig.split("@", 1)[0], "rule": None, "evidence": None, "crash_state": None, "guest_ops": None}
    try:
        data = json.loads(path.read_text()) if path else None
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("finding"), dict):
        entry.update(rule=data["finding"].get("rule"), evidence=data["finding"].get("evidence"),
                     crash_state=data.get("crash_state"), guest_ops=len(data.get("ops", [])))
    return entry


def relative(path: Path, base: Path | None) -> str:
    """A file inside the report as a path relative to it (the report can be moved, merged or downloaded);
    a file outside it (a --known reproducer) as an absolute path, which reads the same from anywhere
    (relative to the directory the user ran in, it pointed nowhere from the report's)."""
    if base is not None:
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            return str(path.resolve())
    return str(path)


def _config_key(config) -> str:
    return f"v{config.version}/cs{config.cluster_size}/rb{config.refcount_bits}/" \
           f"{'lazy' if config.lazy_refcounts else 'eager'}/{config.cache_mode}"


def write_report(directory: Path, summary: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "summary.json", summary)
    timelines = summary.get("throughput_by_shard") or {str(summary["shard"][0]): summary["throughput"]}
    states = {f"shard {k}": [(p["t"], p["crash_states"]) for p in v] for k, v in timelines.items()}
    found = {f"shard {k}": [(p["t"], p["findings"]) for p in v] for k, v in timelines.items()}
    _write(directory / "throughput.svg", plots.line_svg(states, "crash states checked over time", "seconds",
                                                        "crash states"))
    _write(directory / "findings.svg", plots.line_svg(found, "distinct findings over time", "seconds",
                                                      "distinct findings", steps=True))
    _write(directory / "sites.svg", plots.bar_svg(summary["crash_points_by_site"], "crash points by write site"))
    _write(directory / "summary.md", render_markdown(summary))
    return directory


def _write(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def render_markdown(s: dict, *, for_step_summary: bool = False) -> str:
    t = s["timing"]
    held = s.get("shard_label") or f"shard {s['shard'][0]}/{s['shard'][1]}"
    lines = [
        "# qcrash fuzz report",
        "",
        f"- seed **{s['seed']}**, {held}, profile `{s['profile']}`, target `{s.get('target', 'python')}`, "
        f"jobs {s['jobs']}" + (", **interrupted (partial report)**" if s.get("interrupted") else ""),
        f"- injected bugs: {', '.join(s['inject']) or 'none'}; config overrides: {s['config_overrides'] or 'none'}",
        f"- {s['examples']} examples, {s['ops']} operations, **{s['crash_states']} crash states** in {t['seconds']} s "
        f"({t['crash_states_per_second']} states/s, {t['examples_per_second']} examples/s)",
        f"- verdicts: {', '.join(f'{k}: {v}' for k, v in s['verdicts'].items()) or 'no findings'}",
    ]
    if s.get("recovery_crash_states"):
        lines.append(f"- beside them, {s['recovery_crash_states']} crash states of their recoveries judged")
    if s.get("error_points_judged"):
        lines.append(f"- error points judged: {s['error_points_judged']} in {s['error_examples']} examples")
    lines += [f"- **merged despite:** {p}" for p in s.get("merge_problems", [])]
    lines += ["", "## Findings", ""]
    lines += _findings_markdown(s["findings"])
    if for_step_summary:
        return "\n".join(lines) + "\n"
    lines += ["", "## Recovery situations reached", "", "| situation | times |", "|---|---|"]
    for key, value in s["coverage"].items():
        lines.append(f"| {key} | {value}{'  **(never reached)**' if not value else ''} |")
    lines += ["", *coverage.markdown(coverage.table(s.get("structural_events", {})))]
    lines += ["## Crash states by policy", "", "| policy | states |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s["crash_states_by_policy"].items()]
    lines += ["", "## Plots", "", "![throughput](throughput.svg)", "", "![findings](findings.svg)", "",
              "![sites](sites.svg)", "", "## Time per phase", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in t["phase_seconds"].items()]
    lines += ["", "## Configurations", "", "| configuration | examples |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(s["configs"].items())]
    return "\n".join(lines) + "\n"


def _findings_markdown(findings: list[dict]) -> list[str]:
    if not findings:
        return ["None."]
    lines = []
    for f in findings:
        hits = f"{f['count']} hit{'s' if f['count'] != 1 else ''}"
        lines += [f"### `{f['signature']}`: {f.get('status', 'new')}, {hits}", ""]
        if f.get("rule"):
            lines.append(f"- rule broken: {f['rule']}")
        if f.get("crash_state"):
            lines.append(f"- crash: {f['crash_state']}")
        if f.get("evidence"):
            lines.append(f"- evidence: {f['evidence']}")
        if f.get("file"):
            ops = f" ({f['guest_ops']} operations)" if f.get("guest_ops") else ""
            lines.append(f"- reproducer: `{f['file']}`{ops}, crash image and host-op log beside it")
            lines.append(f"- replay (from this report's directory): `qcrash replay {f['file']}`")
        lines.append("")
    return lines
