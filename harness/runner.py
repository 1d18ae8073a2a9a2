"""The differential crash runner: one operation sequence on the model and a target, crashed at every point, recovered and judged.

For each guest operation the runner issues it to the reference model (begin) and to the
target (`harness.executor`), and then, with the operation still *in flight* in the
model, judges crash states at the host-op points the operation produced (the sweep):
`harness.points` chooses the points and states, `harness.judge` judges each crash image
(raw image, recovery, crashes of the recovery).

A `Crash` operation in the sequence picks one crash state (point, policy, index), judges
it the same way, collapses the model onto the recovered image and continues on it.
"""

from __future__ import annotations

import random
import time
from typing import Callable

from harness.config import Config
from harness.crashstates import CrashState
from harness.executor import Executor, Span
from harness.faultfile import WriteLog
from harness.judge import Judge, Where, exc_text, judge_clean_image, judge_closed_reads, read_view
from harness import snapshots
from harness.ops import SNAPSHOT_OPS, Check, Crash, Op, Read, validate_op
from harness.oracle import Finding, Verdict
from harness.points import Budget, choose_points, choose_states, crash_op_for, resolve_crash
from harness.qemu_check import qemu_disagreement
from harness.stats import Stats
from harness.targets import Target, TargetError, get_target
from models.blockio import SECTOR
from models.qcow2.errors import Qcow2Error
from models.refdisk import ReferenceDisk

__all__ = ["Budget", "Runner", "Stats", "qemu_disagreement"]


class Runner:
    """Runs one operation sequence under one configuration; `step` is incremental for the state machine."""

    def __init__(self, config: Config, *, seed: int = 0, budget: Budget | None = None,
                 trace: Callable[[str], None] | None = None, target: str | Target = "python") -> None:
        self.config = config
        self.seed = seed
        self.budget = budget or Budget()
        self.trace = trace or (lambda _line: None)
        self.rng = random.Random(f"qcrash-runner:{seed}")
        self.stats = Stats()
        self.findings: list[Finding] = []
        self.ops: list[Op] = []
        self.target = get_target(target) if isinstance(target, str) else target
        self.executor = Executor(config, self.target, self.stats)
        self.judge = Judge(self.target, self.budget, seed, self.rng, self.stats)

    # ---- what the shrinker, the state machine and tests look at ---------------------------------
    @property
    def model(self) -> ReferenceDisk:
        return self.executor.model

    @property
    def ff(self) -> Target:
        """The host-op log's owner: `.log` and `.point()` (the name predates the target seam)."""
        return self.target

    def _where(self, n: int, state: CrashState | None = None) -> Where:
        # A crash state's finding is named after the guest op in flight at the crash point, not
        # the op being run: a shrunk reproducer (ops + explicit Crash) then keeps its signature.
        at = self.executor.span_at(state.point) if state else None
        index = at.op_index if at else n
        kind = type(self.ops[index]).__name__ if index < len(self.ops) else "finish"
        return Where(n, kind, state, at.start if at else 0)

    def _report(self, finding: Finding | None) -> None:
        if finding is not None:
            self.findings.append(finding)

    # ---- running ---------------------------------------------------------------------------
    def run(self, ops: list[Op], *, stop_at_first: bool = True) -> list[Finding]:
        for op in ops:
            self.step(op)
            if self.findings and stop_at_first:
                return self.findings
        self.finish()
        return self.findings

    def step(self, op: Op) -> list[Finding]:
        """Run one operation; return the findings it produced (also kept in `self.findings`)."""
        n = len(self.ops)
        self.ops.append(op)
        self.stats.ops += 1
        validate_op(op, self.config, f"op #{n}")
        before = len(self.findings)
        t0 = time.perf_counter()
        try:
            self._dispatch(n, op)
        except (Qcow2Error, TargetError) as exc:
            self._report(self._where(n).finding(Verdict.UNEXPECTED_EXCEPTION, f"{type(exc).__name__}: {exc}", "run"))
        except Exception as exc:  # noqa: BLE001 - any crash of the implementation is a finding
            self._report(self._where(n).finding(Verdict.UNEXPECTED_EXCEPTION, exc_text(exc), "run"))
        self.stats.phase_seconds["run"] += time.perf_counter() - t0
        return self.findings[before:]

    def finish(self) -> list[Finding]:
        """Close cleanly and require a clean image whose data equals the model."""
        n = len(self.ops)
        before = len(self.findings)
        if self.findings:
            return []
        try:
            self.target.close()
            raw = self.target.contents()
            where = self._where(n)
            self._report(judge_clean_image(self.target, where, raw))
            self._report(judge_closed_reads(self.target, where, raw, self.model))
            if not self.findings[before:]:
                self._report(snapshots.judge_final(self.target, where, raw, self.model))
        except Exception as exc:  # noqa: BLE001
            self._report(self._where(n).finding(Verdict.UNEXPECTED_EXCEPTION, exc_text(exc), "finish"))
        return self.findings[before:]

    def _dispatch(self, n: int, op: Op) -> None:
        if isinstance(op, Read):
            self._report(self._read(n, op))
        elif isinstance(op, Check):
            result = self.target.live_check()
            if result.problems:
                self._report(self._where(n).finding(Verdict.CHECK_FAILED, result.text(), "run"))
        elif isinstance(op, Crash):
            self._crash(n, op)
        elif isinstance(op, SNAPSHOT_OPS) and (skipped := snapshots.model_refuses(op, self.model)) is not None:
            self.stats.coverage.update([skipped] if skipped else [])
        else:
            self._guest(n, op)

    def _guest(self, n: int, op: Op) -> None:
        issued = self.executor.issue(n, op)
        if issued is None:
            self.stats.coverage["snapshot refused (refcount would overflow)"] += 1
            return
        self.stats.coverage.update(issued.labels)
        repaired = issued.summary
        if repaired is not None and (repaired.problems or repaired.corruptions_fixed or repaired.leaks_fixed):
            self._report(self._where(n).finding(Verdict.CHECK_FAILED, "repair of a healthy image found: "
                                                + repaired.text(), "run"))
        span = issued.span
        if self.budget.sweep and span.end > span.start:
            self._sweep(span)
        self.executor.complete(issued)

    def _read(self, n: int, op: Read) -> Finding | None:
        got = self.target.read(op.offset, op.length)
        want = self.model.read(op.offset, op.length)
        if got == want:
            return None
        bad = next(i for i in range(0, op.length, SECTOR) if got[i:i + SECTOR] != want[i:i + SECTOR])
        sector = (op.offset + bad) // SECTOR
        return self._where(n).finding(Verdict.READ_MISMATCH, f"read {op.offset}+{op.length}: sector {sector} "
                                      f"differs from the model", "run", sector=sector)

    # ---- the sweep -----------------------------------------------------------------------------
    def _sweep(self, span: Span) -> None:
        """Judge crash states at the points of one guest op, with the op in flight in the model."""
        t0 = time.perf_counter()
        log = self.target.log
        points = choose_points(log, span, self.budget, self.rng)
        candidates = choose_states(log, points, self.budget, self.seed, self.rng)
        with self.judge.sweep(self.model):  # (the model stays as it is until the sweep ends)
            self._judge_states(span, log, candidates)
        self.stats.phase_seconds["sweep"] += time.perf_counter() - t0

    def _judge_states(self, span: Span, log: WriteLog, candidates: list[CrashState]) -> None:
        """Judge `candidates` in order; the first finding ends the sweep."""
        builder = self.executor.builder
        seen: set[bytes] = set()
        for state in candidates:
            # Neighbouring states often build the same image: its digest is hashed over the
            # extents, and an image seen before is never joined (image None).
            image, key = builder.image_and_digest(state, known=seen.__contains__)
            if image is None:
                continue
            seen.add(key)
            judged = self.judge.judge(self._where(span.op_index, state), image, self.model, log, deep=self._deep(),
                                      key=key)
            if judged.finding:
                self.findings.append(judged.finding)
                break

    def _deep(self) -> bool:
        every = self.budget.recovery_every
        return every > 0 and self.rng.randrange(every) == 0

    # ---- the chosen crash ------------------------------------------------------------------------
    def _crash(self, n: int, op: Crash) -> None:
        log = self.target.log
        state = self.resolve_crash(op)
        model = self.executor.model_at(state.point)
        # (a large image stays extents over the log, as a sweep's do: never a whole second copy)
        image, key = self.executor.builder.image_and_digest(state)
        judged = self.judge.judge(self._where(n, state), image, model, log, deep=True, key=key)
        del image
        if judged.finding:
            self.findings.append(judged.finding)
            return
        assert judged.recovered is not None and judged.view is not None
        view = judged.view
        model.collapse(lambda off, length: read_view(view, off, length))
        if model.snapshot_names() or model.snapshot_in_flight():
            model.settle_snapshots(frozenset(self.target.snapshots(judged.recovered).names))
        self.executor.continue_from(model, judged.recovered)
        self.trace(f"op #{n}: crashed at [{state.id}], recovered, continuing")

    def resolve_crash(self, op: Crash) -> CrashState:
        """The crash state a Crash op names in the current log (modular choice, or an exact id)."""
        return resolve_crash(self.target.log, op, self.budget, self.seed)

    def crash_op_for(self, state: CrashState) -> Crash:
        """A modular Crash op that selects `state` in the current log (what the shrinker starts from)."""
        return crash_op_for(self.target.log, state, self.budget, self.seed)
