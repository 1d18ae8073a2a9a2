"""The executor: drives one target and the reference model through guest operations, keeping each operation's span of host-op points."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from harness import coverage
from harness.config import Config
from harness.crashstates import CrashImageBuilder
from harness.faultfile import WriteLog
from harness.ops import (Discard, Flush, Op, Reopen, Repair, SnapshotApply, SnapshotCreate, SnapshotDelete, Write,
                         WriteZeroes)
from harness.stats import Stats
from harness.targets import CheckSummary, SnapshotRefused, Target
from models.blockio import CacheMode
from models.payload import make_payload
from models.refdisk import ReferenceDisk

Begin = Callable[[ReferenceDisk], None]


@dataclasses.dataclass
class Span:
    """The host-op points of one guest-level op: crash points start+1 .. end, with the model as it was before it began."""

    op_index: int
    start: int
    end: int
    model_before: ReferenceDisk
    begin: Begin | None  # how the op began in the model (None: it changes no guest data)


@dataclasses.dataclass(frozen=True, slots=True)
class Issued:
    """A guest operation issued to the target, still in flight in the model until `Executor.complete`."""

    span: Span
    summary: CheckSummary | None = None  # what a live repair reported
    events: tuple[str, ...] = ()  # structural events it caused (harness.coverage)
    states_before: int = 0  # crash states judged before it: more at `complete` means it was crashed inside
    labels: tuple[str, ...] = ()  # coverage labels the target reported (snapshot operations)


class Executor:
    """One target's live image and the model in step; every span since the last (re)start, for `model_at`."""

    def __init__(self, config: Config, target: Target, stats: Stats | None = None) -> None:
        self.config = config
        self.stats = stats if stats is not None else Stats()
        self.target = target
        target.create(config)
        self.model = ReferenceDisk(config.virtual_size, config.cache_mode, discard_granularity=config.cluster_size)
        self.spans: list[Span] = []
        self._builder: CrashImageBuilder | None = None

    @property
    def log(self) -> WriteLog:
        return self.target.log

    @property
    def builder(self) -> CrashImageBuilder:
        """Crash images of the current log (one builder per log: it caches the durable image as the log grows)."""
        log = self.target.log
        if self._builder is None or self._builder.log is not log:
            self._builder = CrashImageBuilder(log)
        return self._builder

    def issue(self, n: int, op: Op) -> Issued | None:
        """Begin op #n in the model and run it on the target; the caller sweeps its span, then calls `complete`.

        None: the target refused a snapshot operation before writing anything; the model is
        as it was and neither side ran it.
        """
        begin, call = self._plan(n, op)
        start = self.target.point()
        before = self.model.copy()
        # Reading the dirty bit costs a copy of the image: only before a reopen that switches something.
        options = self.target.options if coverage.is_switch(op) else None
        dirty = options is not None and coverage.is_dirty(self.target.contents()[:coverage.DIRTY_OFFSET + 8])
        if begin:
            begin(self.model)
        try:
            result = call()
        except SnapshotRefused:
            assert self.target.point() == start, "a refused snapshot operation wrote to the image"
            self.model = before
            return None
        span = Span(n, start, self.target.point(), before, begin)
        self.spans.append(span)
        events = tuple(coverage.events_of(self.config, op, self.log.ops[start:span.end], options=options, dirty=dirty))
        coverage.count(self.stats.events, coverage.config_class(self.config), (coverage.OPS, *events))
        if isinstance(result, tuple):
            return Issued(span, None, events, self.stats.crash_states, labels=result)
        return Issued(span, result, events, self.stats.crash_states)

    def complete(self, issued: Issued) -> None:
        if issued.span.begin:
            self.model.complete(issued.span.op_index)
        if issued.events and self.stats.crash_states > issued.states_before:
            coverage.count(self.stats.events, coverage.config_class(self.config), issued.events, crashed=True)

    def _plan(self, n: int, op: Op) -> tuple[Begin | None, Callable[[], CheckSummary | tuple[str, ...] | None]]:
        target = self.target
        if isinstance(op, Write):
            data = make_payload(n, op.offset, op.length, op.seed)
            return lambda m: m.begin_write(n, op.offset, data), lambda: target.write(op.offset, data)
        if isinstance(op, WriteZeroes):
            return (lambda m: m.begin_write_zeroes(n, op.offset, op.length),
                    lambda: target.write_zeroes(op.offset, op.length))
        if isinstance(op, Discard):
            return lambda m: m.begin_discard(n, op.offset, op.length), lambda: target.discard(op.offset, op.length)
        if isinstance(op, Flush):
            return lambda m: m.begin_flush(n), target.flush
        if isinstance(op, Reopen):
            return lambda m: m.begin_flush(n), lambda: self._reopen(op)
        if isinstance(op, Repair):
            return None, lambda: target.live_repair(op.mode)
        if isinstance(op, SnapshotCreate):
            return (lambda m: m.begin_snapshot_create(n, op.name),
                    lambda: target.snapshot_create(op.name, date_sec=n))
        if isinstance(op, SnapshotApply):
            return lambda m: m.begin_snapshot_apply(n, op.name), lambda: target.snapshot_apply(op.name)
        if isinstance(op, SnapshotDelete):
            return lambda m: m.begin_snapshot_delete(n, op.name), lambda: target.snapshot_delete(op.name)
        raise TypeError(f"op #{n}: {type(op).__name__} is not a guest operation of the executor")

    def _reopen(self, op: Reopen) -> None:
        self.target.reopen(op.cache_mode, op.lazy_refcounts)
        if op.cache_mode is not None:
            # The durability rule of later writes follows the new mode.
            self.model.cache_mode = CacheMode(op.cache_mode)

    def span_at(self, point: int) -> Span | None:
        """The span of the guest op in flight at crash point `point` (None between ops)."""
        return next((span for span in self.spans if span.start < point <= span.end), None)

    def model_at(self, point: int) -> ReferenceDisk:
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

    def continue_from(self, model: ReferenceDisk, image: bytes) -> None:
        """After a crash: drop the live image, continue on the recovered `image` with `model` (collapsed onto it)."""
        self.target.abort()
        # The recovered image is opened with the current cache mode; later writes follow its rule.
        model.cache_mode = self.target.options.cache_mode
        self.model = model
        self.target.restart(image)
        self.spans = []
