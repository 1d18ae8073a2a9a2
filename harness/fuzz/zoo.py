"""The bug zoo run: fuzz against each injected bug with the same budget and seeds, and measure time to detection."""

from __future__ import annotations

import dataclasses
import multiprocessing
from pathlib import Path

from harness.fuzz import engine as fz
from harness.fuzz.corpus import atomic_write_json
from harness.shrink import crash_atoms, guest_op_count
from models.qcow2.inject import BUGS as CRASH_BUGS
from models.qcow2.inject import ERROR_BUGS

BUGS = {**CRASH_BUGS, **ERROR_BUGS}  # error-handling bugs are hunted with every example's error points swept


@dataclasses.dataclass
class ZooRow:
    bug: str
    description: str
    detected: bool
    seconds_to_detect: float | None
    examples_until: int
    crash_states_until: int
    guest_ops: int | None
    crash_atoms: int | None
    verdict: str | None
    reproducer: str | None


def hunt(bug: str, seconds: float, seed: int, profile: str, out: Path) -> ZooRow:
    """Fuzz with one bug switched on until the first finding or the budget runs out."""
    opts = fz.FuzzOptions(examples=None, seconds=seconds, seed=seed, jobs=1, profile=profile,
                          corpus=out / bug, inject=[bug], shrink=True, stop_after_findings=1,
                          error_examples=1.0 if bug in ERROR_BUGS else None)
    first = {}

    def on_outcome(o: fz.Outcome) -> None:
        if o.finding is not None and not first:
            first.update(outcome=o)

    result = fz.fuzz(opts, on_outcome=on_outcome)
    # Time to detection: the run time of every example up to and including the first
    # finding (one core, examples in order); shrinking afterwards is not counted.
    states = examples = 0
    seconds = 0.0
    for o in result.outcomes:
        examples += 1
        states += o.stats.crash_states
        seconds += o.seconds
        if o.finding is not None:
            first["t"] = seconds
            break
    if not first:
        return ZooRow(bug, BUGS[bug], False, None, examples, states, None, None, None, None)
    o = first["outcome"]
    rep = o.reproducer
    path = next(iter(result.findings.values()), None)
    return ZooRow(bug, BUGS[bug], True, round(first["t"], 2), examples, states, guest_op_count(rep.ops),
                  crash_atoms(rep.ops), str(o.finding.verdict), str(path) if path else None)


def _hunt_args(args: tuple) -> ZooRow:
    return hunt(*args)


def run_zoo(bugs: list[str], *, seconds: float, seed: int, jobs: int, profile: str, out: Path) -> list[ZooRow]:
    args = [(b, seconds, seed, profile, out) for b in bugs]
    if jobs <= 1:
        rows = [_hunt_args(a) for a in args]
    else:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            rows = pool.map(_hunt_args, args)
    write_table(rows, out, seconds=seconds, seed=seed, profile=profile)
    return rows


def write_table(rows: list[ZooRow], out: Path, **meta) -> None:
    out.mkdir(parents=True, exist_ok=True)
    detected = [r for r in rows if r.detected]
    sizes = sorted(r.guest_ops for r in detected if r.guest_ops is not None)
    median = sizes[len(sizes) // 2] if sizes else None
    summary = {**meta, "bugs": len(rows), "detected": len(detected), "median_shrunk_guest_ops": median,
               "rows": [dataclasses.asdict(r) for r in rows]}
    atomic_write_json(out / "zoo.json", summary)
    lines = [f"# qcrash zoo: {len(detected)}/{len(rows)} bugs detected", "",
             f"budget {meta['seconds']:g}s per bug, seed {meta['seed']}, profile {meta['profile']}; "
             f"median shrunk reproducer: {median} guest ops", "",
             "| bug | detected | time to detect (s) | examples | crash states until then | shrunk guest ops | crash atoms | verdict | what it stands for |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r.bug}` | {'yes' if r.detected else '**NO**'} | {r.seconds_to_detect if r.detected else '-'} | "
                     f"{r.examples_until} | {r.crash_states_until} | {r.guest_ops if r.detected else '-'} | "
                     f"{r.crash_atoms if r.detected else '-'} | {r.verdict or '-'} | {r.description} |")
    (out / "zoo.md").write_text("\n".join(lines) + "\n")


def format_rows(rows: list[ZooRow]) -> str:
    width = max(len(r.bug) for r in rows)
    out = []
    for r in rows:
        if r.detected:
            out.append(f"{r.bug:<{width}}  detected in {r.seconds_to_detect:6.2f}s after {r.crash_states_until} states; "
                       f"{r.verdict}; shrunk to {r.guest_ops} guest ops")
        else:
            out.append(f"{r.bug:<{width}}  NOT DETECTED ({r.examples_until} examples, {r.crash_states_until} states)")
    return "\n".join(out)
