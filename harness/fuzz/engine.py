"""The fuzz engine: seeded examples, shard partitioning, worker processes, shrinking and live recording of findings."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from harness.fuzz import corpus as corpusmod
from harness.fuzz import evidence as evidencemod
from harness import profiles
from harness.config import Config
from harness.generate import generate
from harness.ops import SNAPSHOT_OPS, Op
from harness.heap import frozen_heap
from harness.oracle import Finding
from harness.runner import Runner, Stats
from harness.shrink import crash_atoms, guest_op_count, shrink
from harness.targets import RecoveryPath
from harness.targets.qemu.spec import TargetSpec, detail_of, spec_of
from harness.targets.qemu.spec import make as make_target
from harness.targets.qemu.spec import release as release_target

@dataclasses.dataclass
class FuzzOptions:
    examples: int | None = 30
    seconds: float | None = None  # a hard limit: examples, shrinking and evidence all fit inside it
    seed: int = 0
    jobs: int = 1
    shard: tuple[int, int] = (0, 1)
    profile: str = "dev"
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)
    corpus: Path = Path("reports/findings")
    inject: list[str] = dataclasses.field(default_factory=list)
    known: dict[str, str] = dataclasses.field(default_factory=dict)  # known signature -> its file: counted, not re-recorded
    shrink: bool = True
    stop_after_findings: int | None = None  # stop once this many distinct new findings are on file (-x: 1)
    target: str = "python"
    target_spec: TargetSpec | None = None  # with target "qemu": binaries, version, options
    error_examples: float | None = None  # fraction of examples swept for error points; None: the profile's


@dataclasses.dataclass
class Outcome:
    index: int
    example_seed: int
    config: Config
    ops: int
    stats: Stats
    seconds: float
    finding: Finding | None = None
    reproducer: corpusmod.Reproducer | None = None
    new: bool = False  # the first finding of its signature in this run (recorded and shrunk)
    shrink_seconds: float = 0.0
    shrink_cut: bool = False  # shrinking was cut short by the time budget or a signal
    raw_ops: list[Op] = dataclasses.field(default_factory=list, repr=False)
    error_points: int = 0  # error-point runs judged (harness.errorpoints)


def example_seed(base: int, index: int) -> int:
    """Global example `index` of run seed `base`: shard I of N takes indices I, I+N, I+2N, ... (never overlapping)."""
    digest = hashlib.blake2b(f"qcrash:{base}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


QEMU_RECOVERY_PATHS = (RecoveryPath.OPEN, RecoveryPath.CHECK_ALL)


def run_example(args: tuple) -> Outcome:
    """One example, in a worker process: generate and run it; with `do_shrink`, also shrink what it finds."""
    index, base_seed, overrides, profile, inject, do_shrink, *rest = args
    spec = rest[0] if rest else None  # callers from before the target seam pass six fields
    errors = rest[1] if len(rest) > 1 and rest[1] is not None else profiles.get(profile).error_examples
    from models.qcow2 import inject as injectmod

    injectmod.set_active(inject)
    seed = example_seed(base_seed, index)
    config, ops = generate(seed, overrides, profile)
    budget = profiles.get(profile).budget
    t0 = time.perf_counter()
    if spec is not None and spec.name == "qemu":
        # Users bring a crashed QEMU image back by opening it or by `qemu-img check -r all`: judge both.
        budget = dataclasses.replace(budget, recovery_paths=QEMU_RECOVERY_PATHS)
    target = make_target(spec)
    if not isinstance(target, str) and not target.supports_snapshots:
        ops = [op for op in ops if not isinstance(op, SNAPSHOT_OPS)]
    runner = Runner(config, seed=seed, budget=budget, target=target)
    # After each large image the judge collects garbage; inside this scope its first
    # collection freezes what lived before (modules, memos, caches) out of the later ones.
    with frozen_heap():
        try:
            findings = runner.run(ops)
        finally:
            release_target(getattr(runner, "target", None))
    out = Outcome(index, seed, config, len(ops), runner.stats, time.perf_counter() - t0)
    if findings:
        out.finding = findings[0]
        out.raw_ops = list(runner.ops)
        out.reproducer = corpusmod.Reproducer(config, list(runner.ops), seed, budget, findings[0], seed, sorted(inject),
                                              shrunk_from=len(runner.ops), target=spec.name if spec else "python",
                                              qemu=detail_of(spec) if spec else None)
    elif spec is None or spec.name == "python":
        with frozen_heap():  # (the error sweep's images sit in reference cycles too)
            _sweep_errors(out, ops, budget, errors, sorted(inject))
    if out.reproducer is not None and do_shrink:
        out.reproducer = shrink_reproducer(out.reproducer, profiles.get(profile).shrink_seconds)
    return out


def _sweep_errors(out: Outcome, ops: list[Op], budget, fraction: float, inject: list[str]) -> None:
    """A seeded share of the examples without a crash finding also has its error points judged (python target)."""
    from harness import errorpoints

    if not errorpoints.chosen(fraction, out.example_seed):
        return
    t0 = time.perf_counter()
    swept = errorpoints.sweep(out.config, ops, out.example_seed)
    out.error_points, out.seconds = swept.judged, out.seconds + time.perf_counter() - t0
    if swept.finding is not None:
        out.finding, out.raw_ops = swept.finding, list(ops)
        out.reproducer = corpusmod.Reproducer(out.config, list(ops), out.example_seed, budget, swept.finding,
                                              out.example_seed, inject, shrunk_from=len(ops), errors=swept.case)


def shrink_reproducer(rep: corpusmod.Reproducer, seconds: float,
                      stop: Callable[[], bool] = lambda: False) -> corpusmod.Reproducer:
    """The same finding with fewer operations (same signature), within `seconds`."""
    assert rep.finding is not None
    if rep.errors is not None:
        from harness import errorpoints

        ops, finding = errorpoints.shrink(rep.config, rep.ops, rep.errors, rep.finding, seconds, stop)
        return dataclasses.replace(rep, ops=ops, finding=finding, shrunk_from=len(rep.ops))
    ops, budget, finding = shrink(rep.config, rep.ops, rep.seed, rep.budget, rep.finding, seconds=seconds, stop=stop,
                                  target=spec_of(rep.target, rep.qemu))
    return dataclasses.replace(rep, ops=ops, budget=budget, finding=finding, shrunk_from=len(rep.ops))


def finish_finding(args: tuple) -> tuple[corpusmod.Reproducer, evidencemod.Evidence, bool]:
    """In a worker: shrink a new finding (unless seconds is 0) and gather its evidence; True when cut short."""
    rep, inject, seconds, deadline = args
    from models.qcow2 import inject as injectmod

    injectmod.set_active(inject)
    stop = (lambda: time.time() > deadline) if deadline else (lambda: False)
    t0 = time.monotonic()
    if seconds > 0:
        rep = shrink_reproducer(rep, seconds, stop)
    cut = stop() or (seconds > 0 and time.monotonic() - t0 >= seconds)
    return rep, evidencemod.gather(rep), cut


@dataclasses.dataclass
class FuzzResult:
    outcomes: list[Outcome]
    findings: dict[str, Path]  # signature -> reproducer file (new in this run)
    counts: dict[str, int]
    stats: Stats
    seconds: float
    interrupted: bool
    timeline: list[tuple[float, int, int, int]]  # (t, examples, crash states, distinct findings)
    known_hits: dict[str, int] = dataclasses.field(default_factory=dict)
    unfinished: int = 0  # examples cut off by the time budget or a signal
    signal: int | None = None  # the signal that stopped the run (SIGINT, SIGTERM), if any
    found_at: dict[str, float] = dataclasses.field(default_factory=dict)  # signature -> seconds into the run


def _indices(opts: FuzzOptions) -> Iterator[int]:
    shard, nshards = opts.shard
    j = 0
    while opts.examples is None or j < opts.examples:
        yield shard + j * nshards
        j += 1


class _Run:
    """The bookkeeping of one fuzz run: identity, dedup before shrinking, the budget, the corpus and the timeline."""

    def __init__(self, opts: FuzzOptions, on_outcome: Callable[[Outcome], None] | None, progress) -> None:
        self.opts, self.on_outcome, self.progress = opts, on_outcome, progress
        self.t0 = time.monotonic()
        self.deadline = self.t0 + opts.seconds if opts.seconds else None
        self.wall_deadline = time.time() + opts.seconds if opts.seconds else None
        self.signal: int | None = None
        self.outcomes: list[Outcome] = []
        self.files: dict[str, Path] = {}
        self.counts: dict[str, int] = {}
        self.known_hits: dict[str, int] = {}
        self.found_at: dict[str, float] = {}
        self.total = Stats()
        self.timeline: list[tuple[float, int, int, int]] = []
        self.unfinished = 0

    def expired(self) -> bool:
        """Out of time, or stopped by a signal: running work is abandoned."""
        return self.signal is not None or (self.deadline is not None and time.monotonic() > self.deadline)

    def no_more(self) -> bool:
        """No new examples: expired, or enough distinct findings."""
        limit = self.opts.stop_after_findings
        return self.expired() or bool(limit and len(self.files) >= limit)

    def accept(self, out: Outcome) -> tuple | None:
        """Count an example; record a new signature at once (unshrunk) and return the work to finish it."""
        self.outcomes.append(out)
        self.total.merge(out.stats)
        work = None
        if out.finding is not None and out.reproducer is not None:
            sig = out.finding.signature()
            if sig in self.opts.known:
                self.known_hits[sig] = self.known_hits.get(sig, 0) + 1
            elif sig in self.files:  # a duplicate: counted, never shrunk again
                self.counts[sig] += 1
                corpusmod.bump_count(self.files[sig])
            else:
                out.new = True
                self.counts[sig] = 1
                self.found_at[sig] = round(time.monotonic() - self.t0, 2)
                self.files[sig] = corpusmod.record(self.opts.corpus, out.reproducer)
                work = self._finish_args(out.reproducer)
        self.timeline.append((round(time.monotonic() - self.t0, 2), len(self.outcomes), self.total.crash_states,
                              len(self.files)))
        if self.progress:
            self.progress.update(len(self.outcomes), self.total.crash_states, len(self.files))
        if work is None:
            self.emit(out)
        return work

    def _finish_args(self, rep: corpusmod.Reproducer) -> tuple | None:
        seconds = profiles.get(self.opts.profile).shrink_seconds if self.opts.shrink else 0.0
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return None  # out of time: the unshrunk file stays, without evidence
            seconds = min(seconds, left)
        return rep, self.opts.inject, seconds, self.wall_deadline

    def finished(self, out: Outcome, rep: corpusmod.Reproducer, evidence, cut: bool, seconds: float) -> None:
        out.reproducer, out.shrink_cut, out.shrink_seconds = rep, cut, seconds
        corpusmod.save(self.files[out.finding.signature()], rep, evidence)
        if rep.target == "qemu" and not cut:
            from harness.targets.qemu.repro import artifacts_beside

            artifacts_beside(self.files[out.finding.signature()], rep, self.opts.target_spec or spec_of("qemu"))
        self.emit(out)

    def finish_inline(self, out: Outcome, work: tuple) -> None:
        rep, _inject, seconds, _wall = work
        t0 = time.monotonic()
        if seconds > 0:
            rep = shrink_reproducer(rep, seconds, self.expired)
        cut = self.expired()
        evidence = None if cut else evidencemod.gather(rep)
        self.finished(out, rep, evidence, cut, time.monotonic() - t0)

    def emit(self, out: Outcome) -> None:
        if self.on_outcome:
            self.on_outcome(out)

    def result(self) -> FuzzResult:
        self.outcomes.sort(key=lambda o: o.index)
        return FuzzResult(self.outcomes, self.files, self.counts, self.total, time.monotonic() - self.t0,
                          self.signal is not None, self.timeline, self.known_hits, self.unfinished, self.signal,
                          self.found_at)


def fuzz(opts: FuzzOptions, *, on_outcome: Callable[[Outcome], None] | None = None,
         progress=None) -> FuzzResult:
    """Run examples until the count, the time budget or the findings limit is reached; findings reach the corpus as they are made.

    Duplicates are dropped before shrinking: only the first example of a signature is
    shrunk (inside the time budget) and gets its evidence; later hits only bump its count.
    """
    run = _Run(opts, on_outcome, progress)

    def on_signal(signum, _frame):
        run.signal = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    args = ((i, opts.seed, opts.overrides, opts.profile, opts.inject, False, opts.target_spec, opts.error_examples)
            for i in _indices(opts))
    try:
        if opts.jobs <= 1:
            for a in args:
                if run.no_more():
                    break
                out = run_example(a)
                work = run.accept(out)
                if work is not None:
                    run.finish_inline(out, work)
        else:
            _pool_loop(run, args, opts.jobs)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if progress:
        progress.update(len(run.outcomes), run.total.crash_states, len(run.files), force=True)
    return run.result()


def _pool_loop(run: _Run, args: Iterator[tuple], jobs: int) -> None:
    """Examples and finishing work (shrink + evidence) share the worker processes; the parent decides what is new."""
    ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    with ctx.Pool(jobs, initializer=_worker_init) as pool:
        pending: list[tuple[Outcome | None, float, object]] = []  # (outcome being finished or None, start, result)
        exhausted = False
        while True:
            while not exhausted and not run.no_more() and len(pending) < jobs:
                a = next(args, None)
                if a is None:
                    exhausted = True
                    break
                pending.append((None, time.monotonic(), pool.apply_async(run_example, (a,))))
            if not pending:
                break
            ready = [p for p in pending if p[2].ready()]
            if not ready:
                if run.expired():
                    # Out of time, or a signal: running examples are dropped (they have found
                    # nothing yet); a finding being shrunk keeps its unshrunk file.
                    run.unfinished = sum(1 for out, _t, _r in pending if out is None)
                    for out, t0, _r in pending:
                        if out is not None:
                            out.shrink_cut, out.shrink_seconds = True, time.monotonic() - t0
                            run.emit(out)
                    pool.terminate()
                    break
                pending[0][2].wait(0.05)
                continue
            for item in ready:
                pending.remove(item)
                out, t0, res = item
                if out is None:
                    example = res.get()
                    work = run.accept(example)
                    if work is not None:
                        pending.append((example, time.monotonic(), pool.apply_async(finish_finding, (work,))))
                else:
                    rep, evidence, cut = res.get()
                    run.finished(out, rep, evidence, cut, time.monotonic() - t0)


def _worker_init() -> None:
    # The parent decides when to stop; workers ignore ^C so a partial report can be written.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Forked workers inherit the parent's flag-setting SIGTERM handler; Pool.terminate()
    # stops workers with SIGTERM, so they must die of it (or terminate() waits forever).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def describe_reproducer(rep: corpusmod.Reproducer) -> str:
    return f"{guest_op_count(rep.ops)} guest ops, {crash_atoms(rep.ops)} crash-choice atoms"


def default_jobs() -> int:
    return max(1, os.cpu_count() or 1)
