"""Error points in the fuzz flow: a generated example's configuration and operations swept by harness.errorsweep, its verdicts as Findings, and their replay and shrinking."""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable

from harness import errorsweep
from harness.config import Config
from harness.faultfile import ErrorPoint
from harness.heap import collect_after
from harness.ops import Crash, Discard, Flush, Op, Write, WriteZeroes
from harness.oracle import RULES, Finding, Verdict

VARIANTS = ("close", "crash")  # per guest-workload error point; "repair" cases fail a repair of the dirty image
# Runs judged per chosen example at most: every point of a short workload, a seeded sample of a long one.
MAX_RUNS = 96

_VERDICTS = {"swallowed": Verdict.ERROR_SWALLOWED, "lost": Verdict.ERROR_LOST_DATA,
             "corrupt": Verdict.ERROR_CORRUPTION, "repair": Verdict.ERROR_REPAIR_STUCK}


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorCase:
    """What a reproducer needs to replay an error-point finding: the failed host operation and the variant."""

    point: ErrorPoint
    variant: str  # close: the workload goes on and closes; crash: it stops at the failed call; repair: see below

    def source(self) -> str:
        """Valid Python that builds this case (ErrorKind's repr is not)."""
        p = self.point
        return f"ErrorCase(ErrorPoint({p.op!r}, {p.ordinal}, ErrorKind({str(p.kind)!r})), {self.variant!r})"


@dataclasses.dataclass
class SweepResult:
    finding: Finding | None
    case: ErrorCase | None
    judged: int  # error-point runs judged


def chosen(fraction: float, seed: int) -> bool:
    """Whether the example of `seed` is swept for error points (seeded, independent of everything else)."""
    return fraction > 0 and random.Random(f"errors:{seed}").random() < fraction


def workload(config: Config, ops: list[Op]) -> tuple[errorsweep.Workload, list[int]]:
    """The error-sweep workload of an example (up to its first crash) and, per workload op, the example op index.

    Reads and reopens have no error-sweep counterpart and are left out; each write gets its own non-zero pattern.
    """
    wops: list[tuple] = []
    index: list[int] = []
    for i, op in enumerate(ops):
        if isinstance(op, Crash):
            break
        if isinstance(op, Write):
            wops.append(("write", op.offset, op.length, 1 + len(wops) % 255))
        elif isinstance(op, WriteZeroes):
            wops.append(("write", op.offset, op.length, 0))
        elif isinstance(op, Discard):
            wops.append(("discard", op.offset, op.length))
        elif isinstance(op, Flush):
            wops.append(("flush",))
        else:
            continue
        index.append(i)
    w = errorsweep.Workload(config.cluster_size, config.lazy_refcounts, config.cache_mode, config.virtual_size,
                            tuple(wops), version=config.version, refcount_bits=config.refcount_bits)
    return w, index


def to_finding(found: errorsweep.ErrorFinding, ops: list[Op], index: list[int]) -> Finding:
    verdict = _VERDICTS[found.rule]
    at = found.op_index
    op_index = index[at] if 0 <= at < len(index) else (len(ops) if at >= 0 else -1)
    op_kind = type(ops[op_index]).__name__ if 0 <= op_index < len(ops) else "close"
    kind, _, host = found.point.partition("@")
    return Finding(verdict, RULES[verdict], f"{found.evidence} [{found.point}, {found.variant}]", op_index,
                   f"error-{found.variant}", crash_id=found.point, policy=kind or None, op_kind=op_kind)


def sweep(config: Config, ops: list[Op], seed: int, max_runs: int = MAX_RUNS) -> SweepResult:
    """Judge the example's error points (each under both variants, and each of a repair) until the first finding."""
    w, index = workload(config, ops)
    base = errorsweep._base_image(w)
    runs = [(p, v) for p in errorsweep.error_points(w, base) for v in VARIANTS]
    dirty = None
    if config.version == 3:  # a dirty image to repair needs lazy refcounts, so version 3
        dirty = errorsweep.dirty_image(w)
        runs += [(p, "repair") for p in errorsweep.repair_error_points(dirty)]
    if len(runs) > max_runs:
        keep = sorted(random.Random(f"errorpoints:{seed}").sample(range(len(runs)), max_runs))
        runs = [runs[i] for i in keep]
    judged = 0
    for point, variant in runs:
        judged += 1
        if variant == "repair":
            found = errorsweep.repair_point(w, dirty, point)
        else:
            found = errorsweep.run_point(w, point, variant, base)
        if found is not None:
            return SweepResult(to_finding(found, ops, index), ErrorCase(point, variant), judged)
        collect_after(base)  # each point's images sit in reference cycles: 2 MiB clusters held 5 dead copies
    return SweepResult(None, None, judged)


def replay(config: Config, ops: list[Op], case: ErrorCase) -> Finding | None:
    """Run one recorded error point again; the finding it gives now, or None."""
    w, index = workload(config, ops)
    if case.variant == "repair":
        found = errorsweep.repair_point(w, errorsweep.dirty_image(w), case.point)
    else:
        found = errorsweep.run_point(w, case.point, case.variant)
    return to_finding(found, ops, index) if found is not None else None


def shrink(config: Config, ops: list[Op], case: ErrorCase, finding: Finding, seconds: float,
           stop: Callable[[], bool] = lambda: False) -> tuple[list[Op], Finding]:
    """Drop operations one at a time while the same error point still gives the same signature, within `seconds`."""
    end = time.monotonic() + seconds
    sig = finding.signature()
    i = len(ops) - 1
    while i >= 0 and time.monotonic() < end and not stop():
        trial = ops[:i] + ops[i + 1:]
        now = replay(config, trial, case) if trial else None
        if now is not None and now.signature() == sig:
            ops, finding = trial, now
        i -= 1
    return ops, finding
