"""The fuzz engine: seeded examples, shard partitioning, worker processes, shrinking and live recording of findings."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from harness.fuzz import corpus as corpusmod
from harness.config import Config, draw_config
from harness.ops import Op, random_ops
from harness.oracle import Finding
from harness.runner import Budget, Runner, Stats
from harness.targets.qemu.spec import PYTHON, TargetSpec
from harness.targets.qemu.spec import make as make_target
from harness.targets.qemu.spec import release as release_target
from harness.shrink import crash_atoms, guest_op_count, shrink

# Profiles: how long sequences are and how deep each example's sweep goes.
PROFILES: dict[str, dict] = {
    "dev": {"ops": (3, 12), "budget": Budget(), "shrink_seconds": 20.0},
    "ci": {"ops": (3, 10), "budget": Budget(samples=3, states_per_op=8, recovery_every=6), "shrink_seconds": 10.0},
    # Nightly asks real qemu-img check about a sample of raw crash images when it is installed.
    # Nightly sweeps every point of every op under every policy (sampled inside a policy whose
    # space is larger than 2**k, and past 512 states an op) and asks real qemu-img check about
    # a sample of images.
    "nightly": {"ops": (4, 24), "budget": Budget(samples=16, states_per_op=512, recovery_points=4, recovery_every=2,
                                                 qemu_every=50 if shutil.which("qemu-img") else 0),
                "shrink_seconds": 60.0},
}


@dataclasses.dataclass
class FuzzOptions:
    examples: int | None = 30
    seconds: float | None = None
    seed: int = 0
    jobs: int = 1
    shard: tuple[int, int] = (0, 1)
    profile: str = "dev"
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)
    corpus: Path = Path("reports/findings")
    inject: list[str] = dataclasses.field(default_factory=list)
    known: set[str] = dataclasses.field(default_factory=set)  # signatures of known failures: counted, not re-recorded
    shrink: bool = True
    stop_after_findings: int | None = None
    target: TargetSpec = PYTHON  # the implementation under test


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


def example_seed(base: int, index: int) -> int:
    """Global example `index` of run seed `base`: shard I of N takes indices I, I+N, I+2N, ... (never overlapping)."""
    digest = hashlib.blake2b(f"qcrash:{base}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def generate(seed: int, config_overrides: dict[str, str], profile: str) -> tuple[Config, list[Op]]:
    rng = random.Random(seed)
    config = draw_config(rng)
    if config_overrides:
        config = _override(config, config_overrides, rng)
    lo, hi = PROFILES[profile]["ops"]
    return config, random_ops(rng, config, rng.randint(lo, hi))


def _override(config: Config, overrides: dict[str, str], rng: random.Random) -> Config:
    data = config.with_overrides(overrides).to_dict()
    # Keep the drawn config valid around what was pinned (e.g. pinning version=2 forces 16-bit, no lazy).
    if data["version"] == 2:
        if "refcount_bits" not in overrides:
            data["refcount_bits"] = 16
        if "lazy_refcounts" not in overrides:
            data["lazy_refcounts"] = False
    return Config(**data)


def run_example(args: tuple) -> Outcome:
    """One example, in a worker process: generate, run, and shrink what it finds."""
    index, base_seed, overrides, profile, inject, do_shrink, *rest = args
    target = rest[0] if rest else PYTHON  # callers from before the target seam pass six fields
    from models.qcow2 import inject as injectmod

    injectmod.set_active(inject)
    seed = example_seed(base_seed, index)
    config, ops = generate(seed, overrides, profile)
    budget = PROFILES[profile]["budget"]
    t0 = time.perf_counter()
    runner = Runner(config, seed=seed, budget=budget, target=make_target(target))
    try:
        findings = runner.run(ops)
    finally:
        release_target(runner.target)
    out = Outcome(index, seed, config, len(ops), runner.stats, time.perf_counter() - t0)
    if findings:
        finding = findings[0]
        rep_ops, rep_budget, rep_finding = list(runner.ops), budget, finding
        if do_shrink:
            rep_ops, rep_budget, rep_finding = shrink(config, list(runner.ops), seed, budget, finding,
                                                      seconds=PROFILES[profile]["shrink_seconds"], target=target)
        out.finding = finding
        out.reproducer = corpusmod.Reproducer(config, rep_ops, seed, rep_budget, rep_finding, seed, sorted(inject),
                                              shrunk_from=len(runner.ops), target=target)
    return out


class Progress:
    """A live bar on a terminal; plain periodic lines otherwise."""

    def __init__(self, total: int | None, seconds: float | None, stream=sys.stderr) -> None:
        self.total, self.seconds, self.stream = total, seconds, stream
        self.tty = stream.isatty()
        self.t0 = time.monotonic()
        self.last = 0.0

    def update(self, done: int, states: int, findings: int, force: bool = False) -> None:
        now = time.monotonic()
        interval = 0.2 if self.tty else 10.0
        if not force and now - self.last < interval:
            return
        self.last = now
        elapsed = now - self.t0
        rate = states / elapsed if elapsed else 0.0
        if self.total:
            left = f"{done}/{self.total} examples"
            frac = done / self.total
        else:
            left = f"{done} examples, {max(0.0, (self.seconds or 0) - elapsed):.0f}s left"
            frac = min(1.0, elapsed / self.seconds) if self.seconds else 0.0
        line = f"{left} | {states} crash states ({rate:.0f}/s) | {findings} findings | {elapsed:.0f}s"
        if self.tty:
            bar = "#" * int(frac * 24)
            self.stream.write(f"\r[{bar:<24}] {line}\033[K")
            if force:
                self.stream.write("\n")
        else:
            self.stream.write(f"qcrash: {line}\n")
        self.stream.flush()


@dataclasses.dataclass
class FuzzResult:
    outcomes: list[Outcome]
    findings: dict[str, Path]  # signature -> reproducer file
    counts: dict[str, int]
    stats: Stats
    seconds: float
    interrupted: bool
    timeline: list[tuple[float, int, int, int]]  # (t, examples, crash states, findings)
    known_hits: dict[str, int] = dataclasses.field(default_factory=dict)
    unfinished: int = 0  # examples cut off by the time budget or a signal


def _indices(opts: FuzzOptions) -> Iterator[int]:
    shard, nshards = opts.shard
    j = 0
    while opts.examples is None or j < opts.examples:
        yield shard + j * nshards
        j += 1


def fuzz(opts: FuzzOptions, *, on_outcome: Callable[[Outcome], None] | None = None,
         progress: Progress | None = None) -> FuzzResult:
    """Run examples until the count or the time budget is used up; findings reach the corpus as they are made."""
    t0 = time.monotonic()
    deadline = t0 + opts.seconds if opts.seconds else None
    stop = {"flag": False}
    dropped = {"n": 0}

    def on_signal(signum, _frame):
        stop["flag"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    outcomes: list[Outcome] = []
    files: dict[str, Path] = {}
    counts: dict[str, int] = {}
    known_hits: dict[str, int] = {}
    total = Stats()
    timeline = []
    args = ((i, opts.seed, opts.overrides, opts.profile, opts.inject, opts.shrink, opts.target)
            for i in _indices(opts))

    def accept(out: Outcome) -> None:
        outcomes.append(out)
        total.merge(out.stats)
        if out.finding is not None and out.reproducer is not None:
            sig = out.finding.signature()
            if sig in opts.known:
                known_hits[sig] = known_hits.get(sig, 0) + 1
            else:
                counts[sig] = counts.get(sig, 0) + 1
                files[sig] = corpusmod.record(opts.corpus, out.reproducer)
                if counts[sig] == 1 and opts.target.name == "qemu":
                    from harness.targets.qemu.repro import artifacts_beside

                    artifacts_beside(files[sig], out.reproducer, opts.target)
        elapsed = time.monotonic() - t0
        timeline.append((round(elapsed, 2), len(outcomes), total.crash_states, sum(counts.values())))
        if progress:
            progress.update(len(outcomes), total.crash_states, len(counts))
        if on_outcome:
            on_outcome(out)

    def done() -> bool:
        if stop["flag"] or (deadline and time.monotonic() > deadline):
            return True
        return bool(opts.stop_after_findings and len(counts) >= opts.stop_after_findings)

    try:
        if opts.jobs <= 1:
            for a in args:
                if done():
                    break
                accept(run_example(a))
        else:
            ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
            with ctx.Pool(opts.jobs, initializer=_worker_init) as pool:
                pending = []
                it = iter(args)
                exhausted = False
                while True:
                    while not exhausted and not done() and len(pending) < opts.jobs:
                        a = next(it, None)
                        if a is None:
                            exhausted = True
                            break
                        pending.append(pool.apply_async(run_example, (a,)))
                    if not pending:
                        break
                    ready = [p for p in pending if p.ready()]
                    if not ready:
                        if done():
                            # Out of time, or a signal: examples still running are dropped (they
                            # have found nothing yet, or their finding would be on disk already).
                            dropped["n"] = len(pending)
                            pool.terminate()
                            break
                        pending[0].wait(0.05)
                        continue
                    for p in ready:
                        pending.remove(p)
                        accept(p.get())
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if progress:
        progress.update(len(outcomes), total.crash_states, len(counts), force=True)
    outcomes.sort(key=lambda o: o.index)
    return FuzzResult(outcomes, files, counts, total, time.monotonic() - t0, stop["flag"], timeline, known_hits,
                      dropped["n"])


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
