"""The malformed-image fuzz run: seeded cases, the library on each, QEMU and the CLI on a sample, counts by class, shrunk findings, a report.

Deterministic by seed: case i of seed s is always the same image; which cases are sampled
for QEMU and the CLI depends only on i. Findings (unexpected exception, over time, over
memory, read-only write, wrong result) are shrunk and written as regression files that
`corpora/conftest.py` replays (`corpora/hostile/`). Disagreements with QEMU are counted by
normalised reason, with one example case each.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import resource
import time
from pathlib import Path

from harness.fuzz import imagecase, images, imageqemu

FORMAT = "qcrash-hostile-image/1"


@dataclasses.dataclass
class RunSummary:
    seed: int
    cases: int = 0
    seconds: float = 0.0
    steps: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (step, cls) -> n
    classes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # cls -> n
    failures: dict = dataclasses.field(default_factory=dict)  # key -> {"count", "example", "file"}
    disagreements: dict = dataclasses.field(default_factory=dict)  # reason -> {"count", "example"}
    qemu_cases: int = 0
    cli_cases: int = 0
    peak_rss_mib: float = 0.0

    def to_json(self) -> dict:
        return {
            "seed": self.seed, "cases": self.cases, "seconds": round(self.seconds, 1),
            "classes": dict(self.classes), "steps": {f"{s}:{c}": n for (s, c), n in sorted(self.steps.items())},
            "failures": self.failures, "disagreements": self.disagreements,
            "qemu_cases": self.qemu_cases, "cli_cases": self.cli_cases, "peak_rss_mib": round(self.peak_rss_mib, 1),
        }


def _key(step: imagecase.Step) -> str:
    detail = step.detail if step.cls != "over-time" else ""
    detail = re.sub(r"0x[0-9a-fA-F]+|\d+(\.\d+)?", "N", detail)
    return f"{step.name} {step.cls} {detail[:120]}"


def _timing_ok(step: imagecase.Step, q: imageqemu.QemuView | None, time_limit: float) -> bool:
    """Over time is judged against max(time_limit, 10x QEMU on the same file) when QEMU ran."""
    if step.cls != "over-time" or q is None or "interrupted" in step.detail:
        return False
    qemu_s = q.check_seconds if step.name in ("check", "repair") else q.write_seconds
    return step.seconds <= max(time_limit, 10 * qemu_s)


def run_case(case: images.ImageCase, raw: bytes, *, qemu: bool, cli: bool, time_limit: float,
             hard_limit: float) -> tuple[list[imagecase.Step], list[str]]:
    steps = imagecase.run_library(raw, time_limit=time_limit, hard_limit=hard_limit)
    reasons: list[str] = []
    slow = any(s.cls == "over-time" and "interrupted" not in s.detail for s in steps)
    if qemu or (slow and imageqemu.qemu_available()):
        # An unsampled case that ran slow is timed against QEMU too: the bound is 10x QEMU or time_limit.
        q = imageqemu.qemu_view(raw)
        for s in steps:
            if _timing_ok(s, q, time_limit):
                s.cls = s.ended or "result"
        if qemu:
            reasons = imageqemu.disagreements({s.name: s for s in steps}, q)
    if cli:
        steps += imageqemu.cli_steps(raw)
    return steps, reasons


def write_finding(corpus: Path, case: images.ImageCase, step: imagecase.Step, seed: int) -> Path:
    corpus.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^a-z0-9]+", "-", f"{step.cls}-{step.name}-{seed}-{case.index}".lower()).strip("-")
    path = corpus / f"{name}.json"
    obj = {"format": FORMAT, "seed": seed, "case": case.to_json(), "description": case.describe(),
           "failure": {"step": step.name, "class": step.cls, "detail": step.detail}}
    path.write_text(json.dumps(obj, indent=1) + "\n")
    return path


def _shrunk(case: images.ImageCase, step: imagecase.Step, time_limit: float, hard_limit: float) -> images.ImageCase:
    def still_fails(cand: images.ImageCase) -> bool:
        got = imagecase.run_library(cand.build(), time_limit=time_limit, hard_limit=hard_limit, steps=(step.name,))
        return got[0].cls == step.cls

    return images.shrink(case, still_fails) if step.name in imagecase.STEPS else case


def run(seed: int, *, cases: int | None = None, seconds: float | None = None, qemu_every: int = 50,
        cli_every: int = 100, corpus: Path | None = None, time_limit: float = 2.0, hard_limit: float = 30.0,
        progress=None) -> RunSummary:
    """Run cases 0, 1, ... until `cases` are done or `seconds` have passed."""
    summary = RunSummary(seed)
    cache: dict = {}
    start = time.perf_counter()
    use_qemu = qemu_every > 0 and imageqemu.qemu_available()
    i = 0
    while (cases is None or i < cases) and (seconds is None or time.perf_counter() - start < seconds):
        case = images.generate(seed, i, cache)
        raw = case.build(images._cached_build(case.base, cache))
        qemu = use_qemu and i % qemu_every == 0
        cli = cli_every > 0 and i % cli_every == 0
        steps, reasons = run_case(case, raw, qemu=qemu, cli=cli, time_limit=time_limit, hard_limit=hard_limit)
        summary.qemu_cases += qemu
        summary.cli_cases += cli
        for s in steps:
            summary.steps[(s.name, s.cls)] += 1
            summary.classes[s.cls] += 1
            if s.cls in imagecase.FAILURES:
                _record_failure(summary, case, s, corpus, time_limit, hard_limit)
        for r in reasons:
            entry = summary.disagreements.setdefault(r, {"count": 0, "example": {"index": i, "what": case.describe()}})
            entry["count"] += 1
        i += 1
        summary.cases = i
        if progress is not None and i % 500 == 0:
            progress(summary)
    summary.seconds = time.perf_counter() - start
    summary.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return summary


def _record_failure(summary: RunSummary, case: images.ImageCase, step: imagecase.Step, corpus: Path | None,
                    time_limit: float, hard_limit: float) -> None:
    key = _key(step)
    entry = summary.failures.get(key)
    if entry is not None:
        entry["count"] += 1
        return
    entry = summary.failures[key] = {"count": 1, "example": {"index": case.index, "what": case.describe(),
                                                             "detail": step.detail}}
    if corpus is not None:
        small = _shrunk(case, step, time_limit, hard_limit)
        entry["file"] = str(write_finding(corpus, small, step, summary.seed))


def format_summary(s: RunSummary) -> str:
    lines = [f"# qcrash fuzz-images: seed {s.seed}, {s.cases} cases in {s.seconds:.0f}s "
             f"({s.qemu_cases} with QEMU, {s.cli_cases} through the CLI), peak RSS {s.peak_rss_mib:.0f} MiB", "",
             "| class | steps |", "|---|---|"]
    for cls in ("result", "named", *imagecase.FAILURES):
        lines.append(f"| {cls} | {s.classes.get(cls, 0)} |")
    lines += ["", "## Findings (shrunk)", ""]
    if not s.failures:
        lines.append("none")
    for key, e in sorted(s.failures.items(), key=lambda kv: -kv[1]["count"]):
        lines.append(f"- {e['count']}x `{key}`: case {e['example']['index']} ({e['example']['what']})"
                     + (f" -> {e['file']}" if e.get("file") else ""))
    lines += ["", "## Disagreements with QEMU (sampled cases)", ""]
    if not s.disagreements:
        lines.append("none")
    for reason, e in sorted(s.disagreements.items(), key=lambda kv: -kv[1]["count"]):
        lines.append(f"- {e['count']}x {reason} (e.g. case {e['example']['index']}: {e['example']['what']})")
    return "\n".join(lines) + "\n"


def write_report(s: RunSummary, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(s.to_json(), indent=1) + "\n")
    (out / "summary.md").write_text(format_summary(s))
    return out
