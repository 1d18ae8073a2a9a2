"""The recovery judge: one crash image against the crash contract, through the target's pure judging functions.

A crash state goes through (CRASH-CONTRACT.md):

1. the raw image: dirty bit clear on disk => `check` finds no corruption; a read-only
   open reads only allowed values and writes nothing (with a snapshot operation in flight,
   a COPIED flag out of step that `check -r leaks` repairs fully is allowed);
2. recovery by the state's path (`Budget.recovery_paths`; by default a read-write open,
   repairing when dirty, then `check -r leaks` when only leaks remain); afterwards check
   is clean, the dirty and corrupt bits clear, guest data allowed and equal to what the
   read-only open saw; the snapshot rules hold (`harness.snapshots`);
3. crashes of the recovery itself at sampled points of its own log: recovering again
   gives the same guest data and a clean check.

The first broken rule is the state's one finding; its verdict is decided where it is
created (the phase says which verdict a failure of that phase is).
"""

from __future__ import annotations

import dataclasses
import random
import traceback
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from harness import snapshots
from harness.crashstates import CrashImageBuilder, CrashState, Policy, enumerate_states
from harness.crashstates.images import as_bytes
from harness.faultfile import HostOpKind, WriteLog
from harness.heap import collect_after
from harness.imagememo import Facts, Memo
from harness.oracle import RULES, Finding, Verdict
from harness.points import Budget, recovery_path
from harness.qemu_check import qemu_disagreement
from harness.stats import Stats
from harness.targets import HeaderInfo, ReadOnlyView, Recovery, RecoveryPath, Target, TargetError
from models.blockio import SECTOR, WriteSite, sector_runs
from models.refdisk import Mismatch, ReferenceDisk, SectorVerdict

_METADATA_SITES = frozenset(WriteSite) - {WriteSite.DATA}
_GROWTH_SITES = frozenset({WriteSite.REFTABLE_GROW, WriteSite.REFTABLE_SWITCH})
_DATA_VERDICTS = {Mismatch.FOREIGN: Verdict.FOREIGN_DATA, Mismatch.STALE_OR_LOST: Verdict.DATA_LOST,
                  Mismatch.GARBAGE: Verdict.GARBAGE}


@dataclasses.dataclass(frozen=True, slots=True)
class Where:
    """Where a finding appeared: the operation, its kind, and the crash state if any."""

    op_index: int
    op_kind: str
    state: CrashState | None = None
    start: int = 0  # the first host-op point of the op in flight (its span's start), for coverage

    def finding(self, verdict: Verdict, evidence: str, phase: str, sector: int | None = None) -> Finding:
        state = self.state
        return Finding(verdict, RULES[verdict], evidence, self.op_index, phase, state.id if state else None,
                       str(state.policy) if state else None, sector, self.op_kind)


@dataclasses.dataclass(frozen=True, slots=True)
class Judged:
    """One judged crash state: its finding, or the recovered image and the guest data read before recovery."""

    finding: Finding | None
    recovered: bytes | None = None
    view: dict[int, bytes] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class _Phase:
    """A recovery phase and the verdicts its failures carry."""

    name: str
    not_clean: Verdict  # check not clean, a flag left set, or refcounts past EOF
    changed: Verdict  # guest data differs from the read-only view before recovery
    failed: Verdict  # the recovery itself failed
    suffix: str = ""  # appended to the evidence


def _recovery(path: RecoveryPath) -> _Phase:
    how = "" if path is RecoveryPath.OPEN else f" (recovered by {path})"
    return _Phase("recovery", Verdict.NOT_CLEAN_AFTER_REPAIR, Verdict.REPAIR_CHANGED_DATA, Verdict.REPAIR_FAILED, how)


def _recovery_crash(sub: CrashState, path: RecoveryPath) -> _Phase:
    # Recovering a crashed recovery must end where the first recovery would have: any
    # difference, dirty or changed, is non-idempotent repair.
    how = "" if path is RecoveryPath.OPEN else f", recovered by {path}"
    v = Verdict.REPAIR_NOT_IDEMPOTENT
    return _Phase("recovery-crash", v, v, v, f" (recovery crashed at [{sub.id}]{how})")


class Judge:
    """Judges crash images of one run; counts what it saw in `stats` and draws from the run's rng."""

    def __init__(self, target: Target, budget: Budget, seed: int, rng: random.Random, stats: Stats, *,
                 fast: bool = True) -> None:
        self.target = target
        self.budget = budget
        self.seed = seed
        self.rng = rng
        self.stats = stats
        # fast=False is the full path: every judging call goes to the target (the differential test's reference).
        self.memo = Memo(target, enabled=fast)
        self._compared: list[tuple[dict, dict, int | None]] = []  # the last few (post, pre, first difference) of a state
        self._sites_of: Callable[[], WriteLog | None] = lambda: None  # the log `_sites` holds spans of (weakly)
        self._sites: dict[int, tuple[int, dict]] = {}  # start -> (ops scanned up to, site -> first write)
        # The sweep's model, the read-only views it accepted and the snapshot views it found matching: see `sweep`
        self._sweep_model: ReferenceDisk | None = None
        self._views, self._snapshot_views = AcceptedViews(), AcceptedViews()

    @contextmanager
    def sweep(self, model: ReferenceDisk) -> Iterator[None]:
        """Judge the states of one sweep, against `model`, which does not change until the sweep ends.

        Inside, a read-only view equal to one the model accepted earlier in the sweep is
        accepted without judging it again: the states of one sweep mostly read back the
        same guest data (a nightly 512-byte example: 6 distinct views in 60 states), and
        the model's verdicts are a function of the view and of the model alone.
        """
        self._sweep_model, self._views, self._snapshot_views = model, AcceptedViews(), AcceptedViews()
        try:
            yield
        finally:
            # (the views go with the sweep: they pin their bytes)
            self._sweep_model, self._views, self._snapshot_views = None, AcceptedViews(), AcceptedViews()

    def judge(self, where: Where, image: bytes | bytearray, model: ReferenceDisk, log: WriteLog, *, deep: bool,
              key: bytes | None = None) -> Judged:
        """Judge one crash image built from `log` at `where.state`; `deep` also crashes its recovery.

        `key` is the image's digest when the caller computed it already (`harness.imagememo.digest`).
        """
        assert where.state is not None
        self.stats.crash_states += 1
        self.stats.by_policy[str(where.state.policy)] += 1
        self._count_sites(where.state, log)
        if model.snapshot_names() or model.snapshot_in_flight():
            self._count_snapshot_crash(where, model, log)
        try:
            return self._judge(where, self.memo.facts(image, key), model, deep=deep)
        except Exception as exc:  # noqa: BLE001 - any crash of the implementation is a finding
            return Judged(where.finding(Verdict.UNEXPECTED_EXCEPTION, exc_text(exc), "raw"))
        finally:
            self._compared = []  # (they pin views the memo may have dropped: only while one state is judged)
            collect_after(image)

    def _count_sites(self, state: CrashState, log: WriteLog) -> None:
        ops = log.ops
        if state.point:
            last = ops[state.point - 1]
            self.stats.by_site["flush" if last.kind is HostOpKind.FLUSH else str(last.site)] += 1
        for index, _sectors in state.tears:
            if ops[index].site in _METADATA_SITES:
                self.stats.coverage["torn metadata write"] += 1
        sites = {op.site for op in log.unsynced(state.point)}
        if sites & _GROWTH_SITES:
            self.stats.coverage["refcount-table growth crashed"] += 1
        if WriteSite.DIRTY_BIT in sites:
            self.stats.coverage["dirty-bit write unsynced"] += 1

    def _count_snapshot_crash(self, where: Where, model: ReferenceDisk, log: WriteLog) -> None:
        assert where.state is not None
        self.stats.coverage.update(snapshots.crash_coverage(where.op_kind, model,
                                                            self._written_sites(log, where.start, where.state.point)))

    def _written_sites(self, log: WriteLog, start: int, point: int) -> frozenset:
        """The write sites of log.ops[start:point], from where each site first appears after `start`.

        The states of one sweep share their op's span but mostly not their points: listing
        the span again for every point was a nightly example's thousandth of a million
        iterations. Per start, each site's first write is found once (a log's ops are
        never changed, only appended: the scan resumes where it stopped).
        """
        if self._sites_of() is not log:  # (held weakly: an old log holds a whole image)
            self._sites_of, self._sites = weakref.ref(log), {}
        scanned, first = self._sites.get(start, (start, {}))
        if point > scanned:
            ops, write = log.ops, HostOpKind.WRITE
            for index in range(scanned, point):
                op = ops[index]
                if op.kind is write and op.site not in first:
                    first[op.site] = index
            self._sites[start] = (point, first)
        return frozenset(site for site, index in first.items() if index < point)

    def _judge(self, where: Where, raw: Facts, model: ReferenceDisk, *, deep: bool) -> Judged:
        assert where.state is not None
        touched = model.touched_sectors()  # one read set for every image of this state
        bad, pre, pre_fingerprint = self._judge_raw(where, raw, model, touched)
        if bad:
            return Judged(bad)
        path = recovery_path(self.budget, where.state)
        if path is not RecoveryPath.OPEN:  # (counting the default would change every behaviour digest)
            self.stats.coverage[f"recovered by {path}"] += 1
        rec, recovered = self._recover(raw, path, record=True)
        wanted = frozenset(pre).union(touched)
        bad = self._judge_recovery(where, rec, recovered, pre, wanted, _recovery(path), pre_fingerprint)
        if bad:
            return Judged(bad)
        assert rec.image is not None
        bad = snapshots.judge(self.target, where, rec.image, pre, model, lambda: self.memo.snapshots(recovered),
                              self._snapshot_views if self._in_sweep(model) else None)
        if bad:
            return Judged(bad)
        if deep and rec.log is not None and len(rec.log):
            bad = self._crash_recovery(where, rec.log, pre, wanted, path, pre_fingerprint)
            if bad:
                return Judged(bad)
        return Judged(None, rec.image, pre)

    def _judge_raw(self, where: Where, raw: Facts, model: ReferenceDisk,
                   touched: frozenset[int]) -> tuple[Finding | None, dict[int, bytes], bytes | None]:
        """Step 1; with no finding, the guest data the read-only open read (and its view's fingerprint)."""
        memo = self.memo
        hdr = memo.inspect(raw)
        if hdr.error is not None:
            return where.finding(Verdict.UNOPENABLE, hdr.error, "raw"), {}, None
        self.stats.coverage["dirty at open" if hdr.dirty else "clean at open"] += 1
        # The order of the rng calls is part of every seed's behaviour digest.
        if self.budget.qemu_every and self.rng.randrange(self.budget.qemu_every) == 0:
            disagreement = qemu_disagreement(as_bytes(raw.data))
            if disagreement:
                return where.finding(Verdict.QEMU_DISAGREES, disagreement, "raw"), {}, None
            self.stats.coverage["qemu-img check agreed"] += 1
        if not hdr.dirty:
            result = memo.check(raw)
            # A crash inside a snapshot operation may leave COPIED out of step where `check -r
            # leaks` repairs it fully (CRASH-CONTRACT.md, Snapshots).
            if (result.corruptions or result.check_errors) and not (model.snapshot_in_flight()
                                                                    and result.copied_benign):
                return where.finding(Verdict.CORRUPTION_WITHOUT_DIRTY, result.text(), "raw"), {}, None
            if result.leaks:
                self.stats.coverage["leaks after crash"] += 1
        view = memo.read_only(raw, touched)
        if view.changed is not None:
            return where.finding(Verdict.READONLY_OPEN_CHANGED, view.changed, "raw"), {}, None
        if view.error is not None:
            return where.finding(Verdict.UNOPENABLE, f"read-only open: {view.error}", "raw"), {}, None
        verdicts = self._judge_view(model, view.sectors, view.fingerprint)
        if verdicts:
            return data_finding(where, verdicts, "raw"), {}, None
        return None, view.sectors, view.fingerprint

    def _judge_view(self, model: ReferenceDisk, sectors: dict[int, bytes],
                    fingerprint: bytes | None = None) -> list[SectorVerdict]:
        """`model.judge_view`, or no verdicts for a view equal to one the sweep's model accepted (`sweep`)."""
        if not self._in_sweep(model):
            return model.judge_view(sectors)
        if self._views.holds(None, sectors, fingerprint):
            return []
        verdicts = model.judge_view(sectors)
        if not verdicts:
            self._views.add(None, sectors, fingerprint)
        return verdicts

    def _in_sweep(self, model: ReferenceDisk) -> bool:
        """Whether `model` is the sweep's and the fast path judges (the full path remembers no view)."""
        return model is self._sweep_model and self.memo.enabled

    def _recover(self, raw: Facts, path: RecoveryPath, *, record: bool) -> tuple[Recovery, Facts | None]:
        rec, recovered = self.memo.recover(raw, path, self.target.options, record=record)
        self.stats.coverage.update(rec.events)
        return rec, recovered

    def _judge_recovery(self, where: Where, rec: Recovery, recovered: Facts | None, pre: dict[int, bytes],
                        wanted: frozenset[int], phase: _Phase, pre_fingerprint: bytes | None = None) -> Finding | None:
        """Step 2 on one recovery: it succeeded, the image is clean and reads as `pre` did (`wanted`: pre's sectors and the model's)."""
        if rec.image is None:
            return where.finding(phase.failed, f"{rec.error}{phase.suffix}", phase.name)
        memo = self.memo
        assert recovered is not None
        result = memo.check(recovered, past_eof=True)
        hdr = _require_header(memo.inspect(recovered), "recovered image")
        past_eof = list(result.refcounts_past_eof)
        if result.problems or hdr.dirty or hdr.corrupt or past_eof:
            return where.finding(phase.not_clean, f"{result.text()}, incompatible_features="
                                 f"{hdr.incompatible_features:#x}, refcounts past EOF: {past_eof[:8]}{phase.suffix}",
                                 phase.name)
        post = _require_view(memo.read_only(recovered, wanted), "recovered image")
        sector = self._first_difference(post.sectors, pre, post.fingerprint is not None
                                        and post.fingerprint == pre_fingerprint)
        if sector is not None:
            return where.finding(phase.changed, f"sector {sector} reads differently after {phase.name} than the "
                                 f"read-only view before it{phase.suffix}", phase.name, sector=sector)
        return None

    def _first_difference(self, post: dict[int, bytes], pre: dict[int, bytes], same: bool = False) -> int | None:
        """`_first_difference`, remembered for the last few pairs of view objects; None at once when `same`
        (the two views' fingerprints are equal: ReadOnlyView.fingerprint).

        The crashes of one recovery mostly recover to the image the first recovery gave, so
        the memo hands back the very same view, to be compared with the same `pre` again:
        with 4 KiB clusters and 2 MiB of guest data that compare was a tenth of an example.
        Views are never mutated (harness/imagememo.py), so the same two objects compare alike.
        """
        if not self.memo.enabled:
            return _first_difference(post, pre)
        if same:
            return None
        for seen_post, seen_pre, result in self._compared:
            if seen_post is post and seen_pre is pre:
                return result
        result = _first_difference(post, pre)
        self._compared = [(post, pre, result), *self._compared[:3]]
        return result

    def _crash_recovery(self, where: Where, log: WriteLog, pre: dict[int, bytes], wanted: frozenset[int],
                        path: RecoveryPath, pre_fingerprint: bytes | None = None) -> Finding | None:
        """Step 3: crash the recovery at sampled points of its log, recover again, judge again."""
        self.stats.coverage["recovery crashed"] += 1
        builder = CrashImageBuilder(log)
        points = list(range(1, len(log) + 1))
        picks = self.rng.sample(points, min(len(points), self.budget.recovery_points))
        for point in sorted(picks):
            for sub in enumerate_states(log, point, Policy.SUBSETS, k=4, seed=self.seed, samples=2):
                # An image the memo knows is never joined (image None): its facts are found by digest.
                self.stats.recovery_crash_states += 1
                image, key = builder.image_and_digest(sub, known=self.memo.has)
                rec, recovered = self._recover(self.memo.facts(image, key), path, record=False)
                bad = self._judge_recovery(where, rec, recovered, pre, wanted, _recovery_crash(sub, path),
                                           pre_fingerprint)
                if bad:
                    return bad
                if image is not None:
                    collect_after(image)
        return None


class AcceptedViews:
    """Views one sweep's model accepted, by key (None for a read-only view, a snapshot's name for its view),
    most recent first. Held views pin their bytes: at most `MAX_VIEWS`, of at most `MAX_SECTORS` each."""

    MAX_VIEWS, MAX_SECTORS = 4, 8192  # (4 views of 4 MiB)

    def __init__(self) -> None:
        self._held: list[tuple[str | None, dict[int, bytes], bytes | None]] = []

    def holds(self, key: str | None, view: dict[int, bytes], fingerprint: bytes | None = None) -> bool:
        """Whether this very view, or an equal one, was accepted.

        Equal is an equal fingerprint (ReadOnlyView.fingerprint: the consecutive crash
        images of a sweep read the same guest data through different metadata, so their
        views are equal dicts of distinct objects, which a dict compare walks sector by
        sector: a twentieth of a nightly 512-byte-cluster example), else equal sectors
        (compared at C speed; views are never mutated).
        """
        if fingerprint is not None and any(k == key and f == fingerprint for k, _v, f in self._held):
            return True
        return any(k == key and (v is view or v == view) for k, v, _f in self._held)

    def add(self, key: str | None, view: dict[int, bytes], fingerprint: bytes | None = None) -> None:
        if len(view) <= self.MAX_SECTORS:
            self._held.insert(0, (key, view, fingerprint))
            del self._held[self.MAX_VIEWS:]


def _first_difference(post: dict[int, bytes], pre: dict[int, bytes]) -> int | None:
    """The lowest sector whose post-recovery bytes differ from the read-only view (absent from `pre`: zeros)."""
    if post == pre:  # the common case, compared at C speed
        return None
    zero = bytes(SECTOR)
    for s in sorted(post):
        if post[s] != pre.get(s, zero):
            return s
    return None


def judge_clean_image(target: Target, where: Where, raw: bytes) -> Finding | None:
    """After a clean close: check is clean and the dirty bit is clear."""
    result = target.check(raw)
    hdr = _require_header(target.inspect(raw), "after a clean close")
    if result.problems or hdr.dirty:
        return where.finding(Verdict.CHECK_FAILED, f"after a clean close: {result.text()}, "
                             f"incompatible_features={hdr.incompatible_features:#x}", "finish")
    return None


def judge_closed_reads(target: Target, where: Where, raw: bytes, model: ReferenceDisk) -> Finding | None:
    """After a clean close: every sector the model knows reads as the model says (no crash, so no choice)."""
    view = _require_view(target.read_only(raw, model.touched_sectors(), allocated=False), "after a clean close")
    s = first_closed_mismatch(view.sectors, model)
    if s is not None:
        return where.finding(Verdict.READ_MISMATCH, f"sector {s} differs from the model after a clean close",
                             "finish", sector=s)
    return None


_CLOSED_RUN = 2048  # consecutive sectors compared at once (1 MiB)


def first_closed_mismatch(sectors: dict[int, bytes], model: ReferenceDisk) -> int | None:
    """The lowest sector of `sectors` that differs from what the model reads now, or None.

    Compared by runs of consecutive sectors, one model read each (a sector at a time, the
    model's read was a tenth of a 512-byte-cluster example that wrote 2 MiB); a run that
    differs is searched sector by sector, so the answer is the per-sector loop's.
    """
    order = sorted(sectors)
    for i, j in sector_runs(order, _CLOSED_RUN):
        first = order[i]
        want = model.read(first * SECTOR, (j - i) * SECTOR)
        if b"".join([sectors[s] for s in order[i:j]]) == want:
            continue
        for k, s in enumerate(order[i:j]):
            if sectors[s] != want[k * SECTOR:(k + 1) * SECTOR]:
                return s
    return None


def _require_header(hdr: HeaderInfo, what: str) -> HeaderInfo:
    # An image the implementation itself just wrote (recovered, or closed cleanly) that it
    # cannot inspect is a failure of the implementation: reported as an unexpected exception.
    if hdr.error is not None:
        raise TargetError(f"{what}: {hdr.error}")
    return hdr


def _require_view(view: ReadOnlyView, what: str) -> ReadOnlyView:
    if view.changed is not None or view.error is not None:
        raise TargetError(f"{what}: read-only open: {view.changed or view.error}")
    return view


def data_finding(where: Where, verdicts: list[SectorVerdict], phase: str) -> Finding:
    """The finding for the first sector the model refuses; the evidence counts the others."""
    first = verdicts[0]
    more = f" (+{len(verdicts) - 1} more sectors)" if len(verdicts) > 1 else ""
    return where.finding(_DATA_VERDICTS[first.kind], first.message + more, phase, sector=first.sector)


def read_view(view: dict[int, bytes], offset: int, length: int) -> bytes:
    """Guest bytes [offset, offset+length) from a sector view; sectors it lacks read zero."""
    out = bytearray()
    for s in range(offset // SECTOR, (offset + length) // SECTOR):
        out += view.get(s, bytes(SECTOR))
    return bytes(out)


def exc_text(exc: BaseException) -> str:
    """An exception as evidence: type, message and the innermost frame."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"
