"""The differential crash runner: one operation sequence on the model and the image, crashed at every point, recovered and judged.

For each guest operation the runner issues it to the reference model (begin), to the
qcow2 image over the fault-injecting layer, and then, with the operation still *in
flight* in the model, judges crash states at every host-op point the operation
produced (the sweep). A judged crash state goes through:

1. the raw image: dirty bit clear on disk => `check` finds no corruption; a read-only
   open reads only allowed values and writes nothing;
2. recovery: a read-write open (repairing when dirty), then `check -r leaks` when
   leaks remain; afterwards check is clean, the dirty bit clear, guest data allowed
   and equal to what the read-only open saw;
3. crashes of the recovery itself at sampled points of its own log: recovering again
   gives the same guest data and a clean check.

A `Crash` operation in the sequence picks one crash state (point, policy, index), judges
it the same way, collapses the model onto the recovered image and continues (step 4).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
import traceback
from collections import Counter
from typing import Callable

from harness.config import Config
from harness.crashstates import DEFAULT_POLICIES, CrashImageBuilder, CrashState, Policy, enumerate_point, enumerate_states
from harness.faultfile import FaultInjectingFile, OpKind, WriteLog
from harness import snapshots
from harness.ops import SNAPSHOT_OPS, Check, Crash, Discard, Flush, Op, Read, Reopen, Repair, Write, WriteZeroes, validate_op
from harness.oracle import RULES, Finding, Verdict
from models.blockio import CacheMode, MemoryFile, WriteSite
from models.payload import make_payload
from models.qcow2 import check as checkmod
from models.qcow2.errors import Qcow2Error, RepairFailed
from models.qcow2.header import read_header
from models.qcow2.image import Qcow2Image
from models.refdisk import Mismatch, ReferenceDisk

SECTOR = 512
_METADATA_SITES = frozenset(WriteSite) - {WriteSite.DATA}
_RAREST_SITES = frozenset({WriteSite.REFTABLE_GROW, WriteSite.REFTABLE_SWITCH})  # a few times a run
_RARE_SITES = frozenset({WriteSite.REFTABLE_GROW, WriteSite.REFTABLE_SWITCH, WriteSite.REFBLOCK_ALLOC,
                         WriteSite.REFTABLE, WriteSite.L1, WriteSite.DIRTY_BIT, WriteSite.HEADER})


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much of the crash space one run explores."""

    sweep: bool = True  # judge crash states at the points of every guest op
    policies: tuple[str, ...] = tuple(str(p) for p in DEFAULT_POLICIES)
    k: int = 8  # subsets: exhaustive up to 2**k
    samples: int = 4  # states per policy per point when the space is larger
    states_per_op: int = 12  # judged states per guest op at most (seeded sample across its points)
    recovery_points: int = 2  # crash points sampled in each recovery log (step 3)
    recovery_every: int = 4  # step 3 runs on one judged state in this many (0 = never)
    qemu_every: int = 0  # real qemu-img check on one raw crash image in this many (0 = never)

    @classmethod
    def exhaustive(cls) -> "Budget":
        return cls(samples=16, states_per_op=10_000, recovery_points=8, recovery_every=1)


class ReadOnlyFile(MemoryFile):
    """A crash image for read-only judging: any write is a finding, not a silent change."""

    def pwrite(self, offset: int, data: bytes, site: WriteSite = WriteSite.OTHER) -> None:
        raise _ReadOnlyWrite(f"read-only open wrote {len(data)} bytes at {offset:#x} ({site})")

    def truncate(self, size: int) -> None:
        raise _ReadOnlyWrite(f"read-only open truncated the image to {size}")


class _ReadOnlyWrite(Exception):
    pass


@dataclasses.dataclass
class Stats:
    ops: int = 0
    crash_states: int = 0
    by_policy: Counter = dataclasses.field(default_factory=Counter)
    by_site: Counter = dataclasses.field(default_factory=Counter)
    coverage: Counter = dataclasses.field(default_factory=Counter)
    phase_seconds: Counter = dataclasses.field(default_factory=Counter)

    def merge(self, other: "Stats") -> None:
        self.ops += other.ops
        self.crash_states += other.crash_states
        for name in ("by_policy", "by_site", "coverage", "phase_seconds"):
            getattr(self, name).update(getattr(other, name))

    def to_dict(self) -> dict:
        return {"ops": self.ops, "crash_states": self.crash_states, "by_policy": dict(self.by_policy),
                "by_site": dict(self.by_site), "coverage": dict(self.coverage),
                "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()}}


@dataclasses.dataclass
class _Span:
    """The host-op points of one guest-level op: (start, end], with the model as it was before it began."""

    op_index: int
    start: int
    end: int
    model_before: ReferenceDisk
    begin: Callable[[ReferenceDisk], None] | None


@dataclasses.dataclass
class _Judged:
    findings: list[Finding]
    recovered: bytes | None = None
    view: dict[int, bytes] | None = None


class Runner:
    """Runs one operation sequence under one configuration; `step` is incremental for the state machine."""

    def __init__(self, config: Config, *, seed: int = 0, budget: Budget | None = None,
                 trace: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.seed = seed
        self.budget = budget or Budget()
        self.trace = trace or (lambda _line: None)
        self.rng = random.Random(f"qcrash-runner:{seed}")
        self.stats = Stats()
        self.findings: list[Finding] = []
        self.ops: list[Op] = []
        self.cache_mode = config.cache_mode
        self.lazy: bool | None = None
        base = MemoryFile(name="qcrash.qcow2")
        Qcow2Image.create(base, config.virtual_size, version=config.version, cluster_size=config.cluster_size,
                          refcount_bits=config.refcount_bits, lazy_refcounts=config.lazy_refcounts)
        self.model = ReferenceDisk(config.virtual_size, config.cache_mode, discard_granularity=config.cluster_size)
        self._attach(base)

    # ---- plumbing -------------------------------------------------------------------------
    def _attach(self, inner: MemoryFile) -> None:
        self.inner = inner
        self.ff = FaultInjectingFile(inner)
        self.builder = CrashImageBuilder(self.ff.log)
        self.spans: list[_Span] = []
        self.image = Qcow2Image.open(self.ff, cache_mode=self.cache_mode, lazy_refcounts=self.lazy)

    def _finding(self, verdict: Verdict, evidence: str, op_index: int, phase: str,
                 state: CrashState | None = None, sector: int | None = None) -> Finding:
        kind = type(self.ops[op_index]).__name__ if op_index < len(self.ops) else "finish"
        return Finding(verdict, RULES[verdict], evidence, op_index, phase,
                       state.id if state else None, str(state.policy) if state else None, sector, kind)

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
        except Qcow2Error as exc:
            self.findings.append(self._finding(Verdict.UNEXPECTED_EXCEPTION, f"{type(exc).__name__}: {exc}", n, "run"))
        except Exception as exc:  # noqa: BLE001 - any crash of the implementation is a finding
            self.findings.append(self._finding(Verdict.UNEXPECTED_EXCEPTION, _exc_text(exc), n, "run"))
        self.stats.phase_seconds["run"] += time.perf_counter() - t0
        return self.findings[before:]

    def finish(self) -> list[Finding]:
        """Close cleanly and require a clean image whose data equals the model."""
        n = len(self.ops)
        before = len(self.findings)
        if self.findings:
            return []
        try:
            self.image.close()
            self._expect_clean(n, "finish")
            img = Qcow2Image.open(self.inner, readonly=True)
            self._compare_reads(n, img, sorted(self.model.touched_sectors()))
            self.findings.extend(f for f in [snapshots.judge_final(self, img, n)] if f and not self.findings)
        except Exception as exc:  # noqa: BLE001
            self.findings.append(self._finding(Verdict.UNEXPECTED_EXCEPTION, _exc_text(exc), n, "finish"))
        return self.findings[before:]

    def _dispatch(self, n: int, op: Op) -> None:
        img, model = self.image, self.model
        if isinstance(op, Write):
            data = make_payload(n, op.offset, op.length, op.seed)
            self._guest(n, lambda m: m.begin_write(n, op.offset, data), lambda: img.write(op.offset, data))
        elif isinstance(op, WriteZeroes):
            self._guest(n, lambda m: m.begin_write_zeroes(n, op.offset, op.length),
                        lambda: img.write_zeroes(op.offset, op.length))
        elif isinstance(op, Discard):
            self._guest(n, lambda m: m.begin_discard(n, op.offset, op.length), lambda: img.discard(op.offset, op.length))
        elif isinstance(op, Flush):
            self._guest(n, lambda m: m.begin_flush(n), img.flush)
        elif isinstance(op, Read):
            got = img.read(op.offset, op.length)
            want = model.read(op.offset, op.length)
            if got != want:
                bad = next(i for i in range(0, op.length, SECTOR) if got[i:i + SECTOR] != want[i:i + SECTOR])
                self.findings.append(self._finding(
                    Verdict.READ_MISMATCH, f"read {op.offset}+{op.length}: sector {(op.offset + bad) // SECTOR} differs "
                    f"from the model", n, "run", sector=(op.offset + bad) // SECTOR))
        elif isinstance(op, Reopen):
            self._guest(n, lambda m: m.begin_flush(n), lambda: self._reopen(op))
        elif isinstance(op, Check):
            self._live_check(n)
        elif isinstance(op, Repair):
            self._guest(n, None, lambda: self._live_repair(n, op.mode))
        elif isinstance(op, Crash):
            self._crash(n, op)
        elif isinstance(op, SNAPSHOT_OPS):
            snapshots.dispatch(self, n, op)
        else:  # pragma: no cover - validate_op rejects it first
            raise TypeError(f"op #{n}: unknown operation {op!r}")

    def _guest(self, n: int, begin: Callable[[ReferenceDisk], None] | None, call: Callable[[], None]) -> None:
        start = self.ff.point()
        before = self.model.copy()
        if begin:
            begin(self.model)
        call()
        end = self.ff.point()
        span = _Span(n, start, end, before, begin)
        self.spans.append(span)
        if self.budget.sweep and end > start:
            self._sweep(span)
        if begin:
            self.model.complete(n)

    def _reopen(self, op: Reopen) -> None:
        self.image.close()
        if op.cache_mode is not None:
            self.cache_mode = op.cache_mode
            # The durability rule of later writes follows the new mode.
            self.model.cache_mode = CacheMode(op.cache_mode)
        if op.lazy_refcounts is not None:
            self.lazy = op.lazy_refcounts
        self.image = Qcow2Image.open(self.ff, cache_mode=self.cache_mode, lazy_refcounts=self.lazy)

    def _live_check(self, n: int) -> None:
        # Like qemu-img check on an open image: write every cached table first.
        self.image.write_all_metadata()
        result = checkmod.check(self.ff)
        if result.corruptions or result.leaks or result.check_errors:
            self.findings.append(self._finding(Verdict.CHECK_FAILED, _check_text(result), n, "run"))

    def _live_repair(self, n: int, mode: str) -> None:
        self.image.close()
        fix = checkmod.Fix.ALL if mode == "all" else checkmod.Fix.LEAKS
        result = checkmod.repair(self.ff, fix)
        if result.corruptions or result.leaks or result.check_errors or result.corruptions_fixed or result.leaks_fixed:
            self.findings.append(self._finding(Verdict.CHECK_FAILED, "repair of a healthy image found: "
                                               + _check_text(result), n, "run"))
        self.image = Qcow2Image.open(self.ff, cache_mode=self.cache_mode, lazy_refcounts=self.lazy)

    def _expect_clean(self, n: int, phase: str) -> None:
        result = checkmod.check(self.inner)
        hdr = read_header(self.inner, writable=False, check_mode=True).header
        if result.corruptions or result.leaks or result.check_errors or hdr.incompatible_features & 1:
            self.findings.append(self._finding(Verdict.CHECK_FAILED, f"after a clean close: {_check_text(result)}, "
                                               f"incompatible_features={hdr.incompatible_features:#x}", n, phase))

    def _compare_reads(self, n: int, img: Qcow2Image, sectors: list[int]) -> None:
        for s in sectors:
            got = img.read(s * SECTOR, SECTOR)
            if got != self.model.read(s * SECTOR, SECTOR):
                self.findings.append(self._finding(Verdict.READ_MISMATCH, f"sector {s} differs from the model "
                                                   f"after a clean close", n, "finish", sector=s))
                return

    # ---- the sweep -----------------------------------------------------------------------------
    def _sweep(self, span: _Span) -> None:
        """Judge crash states at the points of one guest op, with the op in flight in the model."""
        t0 = time.perf_counter()
        candidates: list[CrashState] = []
        log = self.ff.log
        points = list(range(span.start + 1, span.end + 1))
        if len(points) > self.budget.states_per_op:
            # Long ops (a big write, a refcount-table growth): sample the points, always keeping
            # the last, and spend half the sample on points just after rare metadata writes
            # (new refcount blocks, table growth and switch, L1, dirty bit), which data points
            # would otherwise drown out.
            ops = log.ops
            rarest = [p for p in points[:-1] if ops[p - 1].site in _RAREST_SITES and ops[p - 1].kind is OpKind.WRITE]
            rare = [p for p in points[:-1] if ops[p - 1].kind is OpKind.WRITE and ops[p - 1].site in _RARE_SITES]
            want = self.budget.states_per_op - 1
            chosen = set(rarest[:want // 2])
            chosen |= set(self.rng.sample(rare, min(len(rare), max(0, want // 2 - len(chosen)))))
            rest = [p for p in points[:-1] if p not in chosen]
            chosen |= set(self.rng.sample(rest, min(len(rest), want - len(chosen))))
            points = sorted(chosen | {points[-1]})
        per_point = []
        for point in points:
            states = enumerate_point(log, point, self.budget.policies, k=self.budget.k,
                                     seed=self.seed, samples=self.budget.samples)
            self.rng.shuffle(states)
            per_point.append(states)
        # Round-robin over the points, so every chosen point is judged before any gets a second state.
        while len(candidates) < self.budget.states_per_op and any(per_point):
            for states in per_point:
                if states and len(candidates) < self.budget.states_per_op:
                    candidates.append(states.pop())
        seen: set[bytes] = set()
        for state in candidates:
            image = self.builder.build(state)
            key = _image_key(image)
            if key in seen:
                continue
            seen.add(key)
            judged = self._judge(span.op_index, state, image, self.model, log, deep=self._deep())
            if judged.findings:
                self.findings.extend(judged.findings[:1])
                break
        self.stats.phase_seconds["sweep"] += time.perf_counter() - t0

    def _deep(self) -> bool:
        every = self.budget.recovery_every
        return every > 0 and self.rng.randrange(every) == 0

    def _model_at(self, point: int) -> ReferenceDisk:
        """The model as it was at a crash point: the op whose host ops straddle it is in flight."""
        for span in self.spans:
            if span.start < point <= span.end:
                model = span.model_before.copy()
                if span.begin:
                    span.begin(model)
                return model
            if point <= span.start:
                return span.model_before.copy()
        return self.model.copy()

    # ---- the chosen crash ------------------------------------------------------------------------
    def _crash(self, n: int, op: Crash) -> None:
        log = self.ff.log
        state = self.resolve_crash(op)
        point = state.point
        model = self._model_at(point)
        image = self.builder.build(state)
        judged = self._judge(n, state, image, model, log, deep=True)
        if judged.findings:
            self.findings.extend(judged.findings[:1])
            return
        self.image.abort()
        assert judged.recovered is not None and judged.view is not None
        view = judged.view
        model.collapse(lambda off, length: _read_view(view, off, length))
        model.settle_snapshots(snapshots.names_in(judged.recovered))
        # The recovered image is opened with the current cache mode; later writes follow its rule.
        model.cache_mode = CacheMode(self.cache_mode)
        self.model = model
        self._attach(MemoryFile(judged.recovered, name="qcrash.qcow2"))
        self.trace(f"op #{n}: crashed at [{state.id}], recovered, continuing")

    def resolve_crash(self, op: Crash) -> CrashState:
        """The crash state a Crash op names in the current log (modular choice, or an exact id)."""
        log = self.ff.log
        if op.crash_id is not None:
            state = CrashState.parse(op.crash_id)
            problems = state.problems(log)
            if problems:
                raise ValueError(f"Crash.crash_id = {op.crash_id!r} does not fit the log: " + "; ".join(problems))
            return state
        npoints = len(log) + 1
        point = op.point % npoints if op.point >= 0 else max(0, npoints + op.point)
        states = enumerate_states(log, point, op.policy, k=self.budget.k, seed=self.seed, samples=self.budget.samples)
        if not states:
            states = enumerate_states(log, point, Policy.PREFIX)
        return states[op.state % len(states)]

    def crash_op_for(self, state: CrashState) -> Crash:
        """A modular Crash op that selects `state` in the current log (what the shrinker starts from)."""
        states = enumerate_states(self.ff.log, state.point, state.policy, k=self.budget.k, seed=self.seed,
                                  samples=self.budget.samples)
        # The point is counted back from the end of the log, so the shrinker can drop earlier
        # operations without moving the crash off the host op it was at.
        back = state.point - (len(self.ff.log) + 1)
        for i, s in enumerate(states):
            if s == state:
                return Crash(back, str(state.policy), i)
        return Crash(back, str(state.policy), 0, crash_id=state.id)

    # ---- judging one crash state ---------------------------------------------------------------------
    def _judge(self, n: int, state: CrashState, image: bytearray, model: ReferenceDisk, log: WriteLog,
               *, deep: bool) -> _Judged:
        self.stats.crash_states += 1
        self.stats.by_policy[str(state.policy)] += 1
        self._count_sites(state, log)
        raw = bytes(image)
        try:
            return self._judge_inner(n, state, raw, model, deep=deep)
        except Exception as exc:  # noqa: BLE001
            return _Judged([self._finding(Verdict.UNEXPECTED_EXCEPTION, _exc_text(exc), n, "raw", state)])

    def _count_sites(self, state: CrashState, log: WriteLog) -> None:
        ops = log.ops
        if self.model.snapshot_names() or self.model.snapshot_in_flight():
            snapshots.crash_coverage(self, state.point)
        if state.point:
            last = ops[state.point - 1]
            self.stats.by_site["flush" if last.kind is OpKind.FLUSH else str(last.site)] += 1
        for index, _sectors in state.tears:
            if ops[index].site in _METADATA_SITES:
                self.stats.coverage["torn metadata write"] += 1
        sites = {op.site for op in log.unsynced(state.point)}
        if sites & {WriteSite.REFTABLE_GROW, WriteSite.REFTABLE_SWITCH}:
            self.stats.coverage["refcount-table growth crashed"] += 1
        if WriteSite.DIRTY_BIT in sites:
            self.stats.coverage["dirty-bit write unsynced"] += 1

    def _judge_inner(self, n: int, state: CrashState, raw: bytes, model: ReferenceDisk, *, deep: bool) -> _Judged:
        # 1. the raw crash image
        try:
            hdr = read_header(MemoryFile(raw), writable=False, check_mode=True).header
        except Qcow2Error as exc:
            return _Judged([self._finding(Verdict.UNOPENABLE, str(exc), n, "raw", state)])
        dirty = bool(hdr.incompatible_features & 1)
        self.stats.coverage["dirty at open" if dirty else "clean at open"] += 1
        if self.budget.qemu_every and self.rng.randrange(self.budget.qemu_every) == 0:
            disagreement = qemu_disagreement(raw)
            if disagreement:
                return _Judged([self._finding(Verdict.QEMU_DISAGREES, disagreement, n, "raw", state)])
            self.stats.coverage["qemu-img check agreed"] += 1
        if not dirty:
            result = checkmod.check(MemoryFile(raw))
            if (result.corruptions or result.check_errors) and not (
                    model.snapshot_in_flight() and snapshots.benign_copied(result)):
                return _Judged([self._finding(Verdict.CORRUPTION_WITHOUT_DIRTY, _check_text(result), n, "raw", state)])
            if result.leaks:
                self.stats.coverage["leaks after crash"] += 1
        try:
            ro = Qcow2Image.open(ReadOnlyFile(raw, name=f"crash[{state.id}]"), readonly=True)
            sectors = _judged_sectors(model, ro)
            pre = read_sectors(ro, sectors)
            verdicts = model.judge(lambda off, length: _read_view(pre, off, length), sectors)
        except _ReadOnlyWrite as exc:
            return _Judged([self._finding(Verdict.READONLY_OPEN_CHANGED, str(exc), n, "raw", state)])
        except Qcow2Error as exc:
            return _Judged([self._finding(Verdict.UNOPENABLE, f"read-only open: {exc}", n, "raw", state)])
        if verdicts:
            return _Judged([self._data_finding(verdicts, n, "raw", state)])
        # 2. recovery
        rec = MemoryFile(raw, name=f"crash[{state.id}]")
        rff = FaultInjectingFile(rec)
        failed = self._recover(rff, n, state, "recovery")
        if failed:
            return _Judged([failed])
        bad = self._judge_recovered(rec, pre, model, n, state, "recovery") or snapshots.judge(
            self, rec.getvalue(), pre, model, n, state)
        if bad:
            return _Judged([bad])
        # 3. crash the recovery itself
        if deep and len(rff.log):
            bad = self._crash_recovery(rff.log, pre, n, state)
            if bad:
                return _Judged([bad])
        return _Judged([], rec.getvalue(), pre)

    def _recover(self, file: FaultInjectingFile | MemoryFile, n: int, state: CrashState, phase: str) -> Finding | None:
        messages: list[str] = []
        try:
            img = Qcow2Image.open(file, cache_mode=self.cache_mode, lazy_refcounts=self.lazy, log=messages.append)
            img.close()
            result = checkmod.check(file)
            if (result.leaks or result.corruptions) and not result.check_errors and (
                    not result.corruptions or snapshots.benign_copied(result)):
                checkmod.check(file, checkmod.Fix.LEAKS)
                self.stats.coverage["leaks repaired"] += 1
            if checkmod.drop_refcounts_past_eof(file):
                self.stats.coverage["refcounts past EOF dropped"] += 1
        except (RepairFailed, Qcow2Error) as exc:
            return self._finding(Verdict.REPAIR_FAILED, f"{type(exc).__name__}: {exc}", n, phase, state)
        if any("Rebuilding refcount structure" in m for m in messages):
            self.stats.coverage["refcount rebuild"] += 1
        if messages:
            self.stats.coverage["repaired on open"] += 1
        return None

    def _judge_recovered(self, file: MemoryFile, pre: dict[int, bytes], model: ReferenceDisk, n: int,
                         state: CrashState, phase: str) -> Finding | None:
        result = checkmod.check(file)
        hdr = read_header(file, writable=False, check_mode=True).header
        past_eof = checkmod.refcounts_past_eof(file)
        if result.corruptions or result.leaks or result.check_errors or hdr.incompatible_features & 3 or past_eof:
            return self._finding(Verdict.NOT_CLEAN_AFTER_REPAIR, f"{_check_text(result)}, incompatible_features="
                                 f"{hdr.incompatible_features:#x}, refcounts past EOF: {past_eof[:8]}", n, phase, state)
        img = Qcow2Image.open(ReadOnlyFile(file.getvalue()), readonly=True)
        sectors = sorted(set(pre) | set(_judged_sectors(model, img)))
        post = read_sectors(img, sectors)
        for s in sectors:
            got = post[s]
            want = pre.get(s, bytes(SECTOR))
            if got != want:
                verdict = Verdict.REPAIR_CHANGED_DATA if phase == "recovery" else Verdict.REPAIR_NOT_IDEMPOTENT
                return self._finding(verdict, f"sector {s} reads differently after {phase} than the read-only "
                                     f"view before it", n, phase, state, sector=s)
        return None

    def _crash_recovery(self, log: WriteLog, pre: dict[int, bytes], n: int, state: CrashState) -> Finding | None:
        self.stats.coverage["recovery crashed"] += 1
        builder = CrashImageBuilder(log)
        points = list(range(1, len(log) + 1))
        picks = self.rng.sample(points, min(len(points), self.budget.recovery_points))
        for point in sorted(picks):
            for sub in enumerate_states(log, point, Policy.SUBSETS, k=4, seed=self.seed, samples=2):
                image = builder.build(sub)
                f = MemoryFile(bytes(image), name=f"recovery-crash[{sub.id}]")
                failed = self._recover(f, n, state, "recovery-crash")
                if failed:
                    failed.evidence += f" (recovery crashed at [{sub.id}])"
                    failed.verdict = Verdict.REPAIR_NOT_IDEMPOTENT
                    return failed
                bad = self._judge_recovered(f, pre, self.model, n, state, "recovery-crash")
                if bad:
                    bad.evidence += f" (recovery crashed at [{sub.id}])"
                    bad.verdict = Verdict.REPAIR_NOT_IDEMPOTENT
                    return bad
        return None

    def _data_finding(self, verdicts: list, n: int, phase: str, state: CrashState) -> Finding:
        first = verdicts[0]
        verdict = {Mismatch.FOREIGN: Verdict.FOREIGN_DATA, Mismatch.STALE_OR_LOST: Verdict.DATA_LOST,
                   Mismatch.GARBAGE: Verdict.GARBAGE}[first.kind]
        more = f" (+{len(verdicts) - 1} more sectors)" if len(verdicts) > 1 else ""
        return self._finding(verdict, first.message + more, n, phase, state, sector=first.sector)


def qemu_disagreement(raw: bytes) -> str | None:
    """Run real `qemu-img check` on a crash image; describe any difference from qcrash's check, else None."""
    import json
    import os
    import shutil
    import subprocess
    import tempfile

    if shutil.which("qemu-img") is None:
        return None
    ours = checkmod.check(MemoryFile(raw))
    fd, path = tempfile.mkstemp(suffix=".qcow2")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        proc = subprocess.run(["qemu-img", "check", "-f", "qcow2", "--output=json", path],
                              capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(path)
    try:
        theirs = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return f"qemu-img check exited {proc.returncode} without JSON: {proc.stderr.strip()[:200]}"
    mine = {"corruptions": ours.corruptions, "leaks": ours.leaks, "check-errors": ours.check_errors}
    got = {k: theirs.get(k, 0) for k in mine}
    if mine != got or checkmod.exit_code(ours) != proc.returncode:
        return f"qcrash check {mine} (exit {checkmod.exit_code(ours)}) but qemu-img check {got} (exit {proc.returncode})"
    return None


def _judged_sectors(model: ReferenceDisk, img: Qcow2Image) -> list[int]:
    """Every sector the model knows, plus every sector of every allocated guest cluster (foreign data hides there)."""
    sectors = set(model.touched_sectors())
    per_cluster = img.geo.cluster_size // SECTOR
    for guest in img.allocated_guest_clusters():
        first = guest // SECTOR
        sectors.update(range(first, min(first + per_cluster, img.size // SECTOR)))
    return sorted(sectors)


def read_sectors(img: Qcow2Image, sectors: list[int]) -> dict[int, bytes]:
    """Read sorted sectors, one image read per contiguous run."""
    out: dict[int, bytes] = {}
    i = 0
    while i < len(sectors):
        j = i
        while j + 1 < len(sectors) and sectors[j + 1] == sectors[j] + 1 and j - i < 4095:
            j += 1
        data = img.read(sectors[i] * SECTOR, (j - i + 1) * SECTOR)
        for k in range(i, j + 1):
            off = (k - i) * SECTOR
            out[sectors[k]] = data[off:off + SECTOR]
        i = j + 1
    return out


def _read_view(view: dict[int, bytes], offset: int, length: int) -> bytes:
    out = bytearray()
    for s in range(offset // SECTOR, (offset + length) // SECTOR):
        out += view.get(s, bytes(SECTOR))
    return bytes(out)


def _image_key(image: bytearray) -> bytes:
    return hashlib.blake2b(image, digest_size=16).digest()


def _check_text(result: checkmod.CheckResult) -> str:
    head = f"check: {result.corruptions} corruptions, {result.leaks} leaks, {result.check_errors} check errors"
    if result.messages:
        head += "; " + "; ".join(result.messages[:4])
    return head


def _exc_text(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"
