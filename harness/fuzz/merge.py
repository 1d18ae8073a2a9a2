"""Merging shard reports into one that cannot lie: same run only, each shard once, findings copied, timelines kept."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from harness.fuzz import report as rp
from harness.fuzz.corpus import sidecars

# What makes shard reports parts of one run; a difference is refused unless --force.
SAME_RUN = ("seed", "profile", "target", "inject", "config_overrides")


class MergeError(ValueError):
    """Shard reports that cannot be merged honestly; the message says which and why."""


def _load(d: Path) -> dict:
    path = d / "summary.json"
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"{path}: cannot read a summary: {exc}") from None
    if not isinstance(s, dict) or s.get("format") != rp.SUMMARY_FORMAT or s.get("format_version") != rp.SUMMARY_VERSION:
        raise MergeError(f"{path}: field 'format_version' = {s.get('format_version') if isinstance(s, dict) else s!r}: "
                         f"this qcrash merges {rp.SUMMARY_FORMAT} version {rp.SUMMARY_VERSION}")
    return s


def held(s: dict) -> list[int]:
    return list(s.get("shards_held") or [s["shard"][0]])


def check(dirs: list[Path], summaries: list[dict]) -> tuple[list[str], int, list[int]]:
    """The problems (duplicates, mismatches), the shard count, and the shards held."""
    problems = []
    seen_dirs: dict[Path, Path] = {}
    for d in dirs:
        real = d.resolve()
        if real in seen_dirs:
            problems.append(f"{d} is given twice (as {seen_dirs[real]} too)")
        seen_dirs.setdefault(real, d)
    first = summaries[0]
    for key in SAME_RUN:
        for d, s in zip(dirs[1:], summaries[1:]):
            if s.get(key, "python" if key == "target" else None) != first.get(key, "python" if key == "target" else None):
                problems.append(f"{key} differs: {dirs[0]} has {first.get(key)!r}, {d} has {s.get(key)!r}")
    counts = {s["shard"][1] for s in summaries}
    if len(counts) > 1:
        listed = ", ".join(f"{d}: {s['shard'][1]}" for d, s in zip(dirs, summaries))
        problems.append(f"shard counts differ: {listed}")
    owner: dict[int, Path] = {}
    for d, s in zip(dirs, summaries):
        for i in held(s):
            if i in owner and owner[i].resolve() != d.resolve():
                problems.append(f"shard {i} is in both {owner[i]} and {d}")
            owner.setdefault(i, d)
    return problems, max(counts), sorted(owner)


def label(shards: list[int], total: int) -> str:
    missing = sorted(set(range(total)) - set(shards))
    text = f"shards {','.join(map(str, shards))} of {total}" if len(shards) != 1 else f"shard {shards[0]} of {total}"
    return text + (f" (missing {','.join(map(str, missing))})" if missing else " (all)")


def merge(dirs: list[Path], out: Path, *, force: bool = False) -> dict:
    """Counts add up, findings are unioned by signature and copied, each shard keeps its timeline."""
    summaries = [_load(d) for d in dirs]
    problems, total, shards = check(dirs, summaries)
    if problems and not force:
        raise MergeError("refusing to merge: " + "; ".join(problems) + " (--force merges anyway and says so)")
    unique = {d.resolve(): (d, s) for d, s in zip(dirs, summaries)}  # a directory given twice counts once
    pairs = list(unique.values())
    merged = dict(summaries[0])
    merged.update(shard=[shards[0], total], shards_held=shards, shard_count=total, shard_label=label(shards, total),
                  missing_shards=sorted(set(range(total)) - set(shards)), merged_from=[str(d) for d in dirs],
                  merge_problems=problems, interrupted=any(s.get("interrupted") for _d, s in pairs))
    for key in ("examples", "ops", "crash_states", "recovery_crash_states", "unfinished_examples", "error_examples",
                "error_points_judged"):
        merged[key] = sum(s.get(key, 0) for _d, s in pairs)
    for key in ("crash_states_by_policy", "crash_points_by_site", "coverage", "verdicts", "configs",
                "known_failures_seen", "structural_events"):
        total_counter: Counter = Counter()
        for _d, s in pairs:
            total_counter.update(s.get(key, {}))
        merged[key] = dict(sorted(total_counter.items()))
    merged.update(rp.structural_events(merged["structural_events"]))
    merged["findings"] = _merge_findings(pairs, out)
    timelines: dict[str, list] = {}
    for _d, s in pairs:
        timelines.update(s.get("throughput_by_shard") or {str(s["shard"][0]): s["throughput"]})
    merged["throughput_by_shard"] = dict(sorted(timelines.items(), key=lambda kv: int(kv[0])))
    merged["throughput"] = []
    seconds = max(s["timing"]["seconds"] for _d, s in pairs)
    phases: Counter = Counter()
    for _d, s in pairs:
        phases.update(s["timing"].get("phase_seconds", {}))
    merged["timing"] = {"seconds": seconds, "phase_seconds": {k: round(v, 3) for k, v in sorted(phases.items())},
                        "longest_example_seconds": max(s["timing"].get("longest_example_seconds", 0) for _d, s in pairs),
                        "crash_states_per_second": round(merged["crash_states"] / max(seconds, 1e-9), 2),
                        "examples_per_second": round(merged["examples"] / max(seconds, 1e-9), 3)}
    rp.write_report(out, merged)
    return merged


def _merge_findings(pairs: list[tuple[Path, dict]], out: Path) -> list[dict]:
    """Union by (signature, status); each finding's files are copied into out/findings/ and the paths point there."""
    merged: dict[tuple[str, str], dict] = {}
    for d, s in pairs:
        for f in s["findings"]:
            key = (f["signature"], f.get("status", "new"))
            entry = merged.get(key)
            if entry is not None:
                entry["count"] += f["count"]
                continue
            entry = dict(f)
            merged[key] = entry
            if f.get("file") and f.get("status", "new") == "new":
                entry["file"] = _copy_finding(d / f["file"], out)
    return sorted(merged.values(), key=lambda f: (f.get("status", "new"), f["signature"]))


def _copy_finding(src: Path, out: Path) -> str | None:
    if not src.exists():
        return None
    dest = out / "findings" / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    for a, b in ((src, dest), *zip(sidecars(src), sidecars(dest))):
        if a.exists():
            shutil.copyfile(a, b)
    return str(dest.relative_to(out))
