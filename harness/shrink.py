"""Shrinking a failing case beyond the sweep: make the crash explicit, then drop and simplify operations while the signature holds."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from harness.config import Config
from harness.crashstates import Policy
from harness.ops import GUEST_RANGE_OPS, Crash, Op, Write
from harness.oracle import Finding
from harness.runner import Budget, Runner
from harness.targets.qemu.spec import TargetSpec, make, release

# Policies a shrunk Crash tries in turn, simplest first.
SIMPLER_POLICIES = (Policy.DROP_UNSYNCED, Policy.PREFIX, Policy.SUBSETS)
# Policies whose state is the whole point: no kept/torn/cut choice beyond it.
CHOICELESS_POLICIES = (Policy.PREFIX, Policy.DROP_UNSYNCED)


def reproduces(config: Config, ops: list[Op], seed: int, budget: Budget, signature: str,
               target: TargetSpec | None = None) -> Finding | None:
    """The finding of `ops` if it has this signature; a candidate that fails differently does not reproduce."""
    runner = None
    try:
        runner = Runner(config, seed=seed, budget=budget, target=make(target))
        findings = runner.run(ops)
    except Exception:  # noqa: BLE001 - an invalid candidate (e.g. a crash id that no longer fits) does not reproduce
        return None
    finally:
        if runner is not None:
            release(getattr(runner, "target", None))
    for f in findings:
        if f.signature() == signature:
            return f
    return None


def explicit_crash(config: Config, ops: list[Op], seed: int, budget: Budget, finding: Finding,
                   target: TargetSpec | None = None) -> list[Op] | None:
    """Turn a sweep finding into ops[:n+1] + Crash(...) that reproduces it with the sweep off."""
    if finding.crash_id is None or finding.phase not in ("raw", "recovery", "recovery-crash"):
        return None
    runner = Runner(config, seed=seed, budget=dataclasses.replace(budget, sweep=False), target=make(target))
    try:
        prefix = ops[: finding.op_index + 1]
        for op in prefix:
            runner.step(op)
        from harness.crashstates import CrashState

        state = CrashState.parse(finding.crash_id)
        if state.point > runner.ff.point():
            return None
        return prefix + [runner.crash_op_for(state)]
    finally:
        release(getattr(runner, "target", None))


def shrink(config: Config, ops: list[Op], seed: int, budget: Budget, finding: Finding, *,
           seconds: float = 30.0, stop: Callable[[], bool] = lambda: False,
           target: TargetSpec | None = None) -> tuple[list[Op], Budget, Finding]:
    """Greedy delta-debugging: the smallest sequence found that still fails with the same signature.

    Like Hypothesis, a candidate that slips to a different failure (another verdict, op kind,
    policy or phase) is rejected, so the file named after the signature holds that failure.
    Stops at `seconds` or as soon as `stop()` is true, returning the best so far.
    """
    deadline = time.monotonic() + seconds
    signature = finding.signature()
    best, best_budget, best_finding = list(ops), budget, finding

    def out_of_time() -> bool:
        return time.monotonic() > deadline or stop()

    explicit = None if out_of_time() else explicit_crash(config, ops, seed, budget, finding, target)
    quiet = dataclasses.replace(budget, sweep=False, recovery_every=1)
    if explicit is not None:
        hit = reproduces(config, explicit, seed, quiet, signature, target)
        if hit:
            best, best_budget, best_finding = explicit, quiet, hit
    if best_finding is finding:
        best = best[: finding.op_index + 1]

    def attempt(candidate: list[Op]) -> bool:
        nonlocal best, best_finding
        if out_of_time() or not candidate:
            return False
        hit = reproduces(config, candidate, seed, best_budget, signature, target)
        if hit:
            best, best_finding = candidate, hit
            return True
        return False

    changed = True
    while changed and not out_of_time():
        changed = False
        # 1. drop single operations, from the front
        i = 0
        while i < len(best):
            if attempt(best[:i] + best[i + 1 :]):
                changed = True
            else:
                i += 1
        # 2. simplify each operation
        for i, op in enumerate(list(best)):
            if i >= len(best):
                break
            for simpler in _simpler(op, config):
                if attempt(best[:i] + [simpler] + best[i + 1 :]):
                    changed = True
                    break
    return best, best_budget, best_finding


def _simpler(op: Op, config: Config) -> list[Op]:
    out: list[Op] = []
    cs = config.cluster_size
    if isinstance(op, GUEST_RANGE_OPS):
        for length in (512, cs):
            if length < op.length:
                out.append(dataclasses.replace(op, length=length))
        if op.offset:
            out.append(dataclasses.replace(op, offset=0))
            if op.offset % cs:
                out.append(dataclasses.replace(op, offset=op.offset - op.offset % cs))
    if isinstance(op, Write) and op.seed:
        out.append(dataclasses.replace(op, seed=0))
    if isinstance(op, Crash) and op.crash_id is None:
        if op.point != -1:
            out.append(dataclasses.replace(op, point=-1))
        if op.state:
            out.append(dataclasses.replace(op, state=0))
        for policy in SIMPLER_POLICIES:
            if policy != op.policy:
                out.append(dataclasses.replace(op, policy=policy, state=0))
    return out


def guest_op_count(ops: list[Op]) -> int:
    return sum(1 for op in ops if not isinstance(op, Crash))


def crash_atoms(ops: list[Op]) -> int:
    """Crash-choice atoms: per Crash op, the kept/torn/cut choices beyond 'keep everything'."""
    total = 0
    for op in ops:
        if isinstance(op, Crash):
            total += 1 + (op.state > 0) + (op.policy not in CHOICELESS_POLICIES)
    return total
