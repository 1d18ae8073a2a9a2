"""Run reports: summary.json (data), summary.md with SVG plots (for people), and merging shard reports."""

from __future__ import annotations

import datetime as dt
import json
import platform
from collections import Counter
from pathlib import Path

from harness import __version__
from harness.fuzz.corpus import atomic_write_json
from harness.oracle import digest

# Recovery situations a night should reach; a report says which it never reached.
COVERAGE_KEYS = (
    "dirty at open", "clean at open", "repaired on open", "refcount rebuild", "leaks after crash", "leaks repaired",
    "recovery crashed", "refcount-table growth crashed", "torn metadata write", "dirty-bit write unsynced",
)


def utc_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def build_summary(result, opts, *, argv: list[str]) -> dict:
    stats = result.stats
    per_verdict = Counter()
    findings = []
    for sig, path in sorted(result.findings.items()):
        verdict = sig.split("@", 1)[0]
        per_verdict[verdict] += result.counts[sig]
        findings.append({"signature": sig, "count": result.counts[sig], "file": str(path)})
    seconds = max(result.seconds, 1e-9)
    return {
        "harness_version": __version__,
        "command": argv,
        "seed": opts.seed,
        "shard": list(opts.shard),
        "profile": opts.profile,
        "config_overrides": opts.overrides,
        "inject": opts.inject,
        "jobs": opts.jobs,
        "target": opts.target.to_dict(),
        "python": platform.python_version(),
        "interrupted": result.interrupted,
        "examples": len(result.outcomes),
        "unfinished_examples": getattr(result, "unfinished", 0),
        "example_seeds_digest": digest([o.example_seed for o in result.outcomes]),
        "configs": dict(Counter(_config_key(o.config) for o in result.outcomes)),
        "ops": stats.ops,
        "crash_states": stats.crash_states,
        "crash_states_by_policy": dict(sorted(stats.by_policy.items())),
        "crash_points_by_site": dict(sorted(stats.by_site.items())),
        "coverage": {k: stats.coverage.get(k, 0) for k in COVERAGE_KEYS},
        "verdicts": dict(sorted(per_verdict.items())),
        "findings": findings,
        "known_failures_seen": dict(sorted(getattr(result, "known_hits", {}).items())),
        "timing": {"seconds": round(result.seconds, 3),
                   "phase_seconds": {k: round(v, 3) for k, v in sorted(stats.phase_seconds.items())},
                   "crash_states_per_second": round(stats.crash_states / seconds, 2),
                   "examples_per_second": round(len(result.outcomes) / seconds, 3)},
        "throughput": [{"t": t, "examples": e, "crash_states": c, "findings": f} for t, e, c, f in result.timeline],
    }


def _config_key(config) -> str:
    return f"v{config.version}/cs{config.cluster_size}/rb{config.refcount_bits}/" \
           f"{'lazy' if config.lazy_refcounts else 'eager'}/{config.cache_mode}"


def write_report(directory: Path, summary: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "summary.json", summary)
    (directory / "throughput.svg").write_text(_line_svg(
        [(p["t"], p["crash_states"]) for p in summary["throughput"]], "crash states checked over time", "s", "states"))
    (directory / "findings.svg").write_text(_line_svg(
        [(p["t"], p["findings"]) for p in summary["throughput"]], "distinct findings over time", "s", "findings"))
    (directory / "sites.svg").write_text(_bar_svg(summary["crash_points_by_site"], "crash points by write site"))
    (directory / "summary.md").write_text(render_markdown(summary))
    return directory


def render_markdown(s: dict) -> str:
    t = s["timing"]
    lines = [
        "# qcrash fuzz report",
        "",
        f"- seed **{s['seed']}**, shard {s['shard'][0]}/{s['shard'][1]}, profile `{s['profile']}`, jobs {s['jobs']}"
        + (", **interrupted (partial report)**" if s.get("interrupted") else ""),
        f"- target: {s.get('target', {}).get('name', 'python')} {s.get('target', {}).get('version', '')}".rstrip(),
        f"- injected bugs: {', '.join(s['inject']) or 'none'}; config overrides: {s['config_overrides'] or 'none'}",
        f"- {s['examples']} examples, {s['ops']} operations, **{s['crash_states']} crash states** in {t['seconds']} s "
        f"({t['crash_states_per_second']} states/s, {t['examples_per_second']} examples/s)",
        f"- verdicts: {', '.join(f'{k}: {v}' for k, v in s['verdicts'].items()) or 'no findings'}",
        "",
        "## Findings",
        "",
    ]
    if s["findings"]:
        lines += ["| signature | hits | reproducer |", "|---|---|---|"]
        lines += [f"| `{f['signature']}` | {f['count']} | `{f['file']}` |" for f in s["findings"]]
    else:
        lines.append("None.")
    lines += ["", "## Recovery situations reached", "", "| situation | times |", "|---|---|"]
    for key, value in s["coverage"].items():
        lines.append(f"| {key} | {value}{'  **(never reached)**' if not value else ''} |")
    lines += ["", "## Crash states by policy", "", "| policy | states |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s["crash_states_by_policy"].items()]
    lines += ["", "## Plots", "", "![throughput](throughput.svg)", "", "![findings](findings.svg)", "",
              "![sites](sites.svg)", "", "## Time per phase", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in t["phase_seconds"].items()]
    lines += ["", "## Configurations", "", "| configuration | examples |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(s["configs"].items())]
    return "\n".join(lines) + "\n"


def merge(dirs: list[Path], out: Path) -> dict:
    """Merge shard reports: counts add up, findings are unioned by signature."""
    summaries = []
    for d in dirs:
        path = d / "summary.json"
        try:
            summaries.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read a summary: {exc}") from None
    merged = dict(summaries[0])
    merged["shard"] = [0, 1]
    merged["merged_from"] = [str(d) for d in dirs]
    for key in ("examples", "ops", "crash_states"):
        merged[key] = sum(s[key] for s in summaries)
    for key in ("crash_states_by_policy", "crash_points_by_site", "coverage", "verdicts", "configs"):
        total = Counter()
        for s in summaries:
            total.update(s[key])
        merged[key] = dict(sorted(total.items()))
    sigs: dict[str, dict] = {}
    for s in summaries:
        for f in s["findings"]:
            entry = sigs.setdefault(f["signature"], {"signature": f["signature"], "count": 0, "file": f["file"]})
            entry["count"] += f["count"]
    merged["findings"] = sorted(sigs.values(), key=lambda f: f["signature"])
    seconds = max(s["timing"]["seconds"] for s in summaries)
    merged["timing"] = {"seconds": seconds, "phase_seconds": {},
                        "crash_states_per_second": round(merged["crash_states"] / max(seconds, 1e-9), 2),
                        "examples_per_second": round(merged["examples"] / max(seconds, 1e-9), 3)}
    merged["throughput"] = []
    write_report(out, merged)
    return merged


def _line_svg(points: list[tuple[float, float]], title: str, xlabel: str, ylabel: str) -> str:
    w, h, pad = 560, 260, 44
    if not points:
        points = [(0, 0)]
    xmax = max(p[0] for p in points) or 1
    ymax = max(p[1] for p in points) or 1
    coords = " ".join(f"{pad + (x / xmax) * (w - 2 * pad):.1f},{h - pad - (y / ymax) * (h - 2 * pad):.1f}"
                      for x, y in points)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">'
            f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{title}</text>'
            f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>'
            f'<text x="{w - pad}" y="{h - pad + 16}" text-anchor="end">{xmax:g} {xlabel}</text>'
            f'<text x="{pad - 4}" y="{pad}" text-anchor="end">{ymax:g}</text>'
            f'<text x="{pad - 4}" y="{h - pad}" text-anchor="end">0</text>'
            f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" text-anchor="middle">{ylabel}</text>'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{coords}"/></svg>\n')


def _bar_svg(values: dict[str, int], title: str) -> str:
    items = sorted(values.items(), key=lambda kv: -kv[1]) or [("none", 0)]
    w, row = 560, 20
    h = 30 + row * len(items)
    vmax = max(v for _, v in items) or 1
    bars = []
    for i, (k, v) in enumerate(items):
        y = 26 + i * row
        bars.append(f'<text x="130" y="{y + 13}" text-anchor="end">{k}</text>'
                    f'<rect x="136" y="{y}" width="{(v / vmax) * 360:.1f}" height="{row - 4}" fill="#ff7f0e"/>'
                    f'<text x="{140 + (v / vmax) * 360:.1f}" y="{y + 13}">{v}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">'
            f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{title}</text>{"".join(bars)}</svg>\n')
