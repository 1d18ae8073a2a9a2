"""The python target: qcrash's own qcow2 (`models/qcow2`) over the fault-injecting file layer."""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable

import xxhash

from harness.config import Config
from harness.crashstates.images import Extents, Image, as_bytes
from harness.faultfile import FaultInjectingFile, WriteLog
from harness.targets.readmemo import ReadMemo, merged, replay_writes, union
from harness.snapshots import benign_copied, shared_data_events
from harness.targets import (CheckSummary, HeaderInfo, OpenOptions, ReadOnlyView, Recovery, RecoveryPath,
                             SnapshotReader, SnapshotRefused, Target)
from models.blockio import (INT64_MAX, SECTOR, BlockFile, CacheMode, MemoryFile, WriteSite, _check_range, _io_error,
                            read_exact, sector_runs, split_sectors)
from models.qcow2 import check as checkmod
from models.qcow2 import inject, snapshot, spec
from models.qcow2.entries import ClusterType, not_normal_flags
from models.qcow2.errors import Qcow2Error, RepairFailed
from models.qcow2.header import read_header
from models.qcow2.image import Qcow2Image

IMAGE_NAME = "qcrash.qcow2"


def _image(raw: Image | bytearray) -> Image:
    """An image as the judging functions take it: bytes, or a large image's `Extents` as they are (a buffer is copied:
    it must not change under a memoised result)."""
    return raw if type(raw) is bytes or type(raw) is Extents else bytes(raw)


_VIEW_SLICE_FROM = 8192  # reads of a written image from this length are copied out through a memoryview


class CopyOnWriteFile(MemoryFile):
    """A MemoryFile over immutable image bytes that copies them only at its first change.

    Judging opens each crash image several times (header, check, read-only open,
    recovery); most of those never write, so none of them should pay for a copy of a
    large image (2 MiB clusters) up front. A large image (from `_EXTENTS_FROM` bytes) is
    never copied whole while it changes: its writes are laid over the bytes as extents
    (`Extents`) and `getvalue` joins them once. A recovery of a 16 MiB image otherwise held
    the image, its writable copy and, while `getvalue` ran, a third copy at once: the peak
    of a worker's memory with 2 MiB clusters. A file made over an image judged as
    `Extents` lays its writes over a copy of those, and `frozen_image` hands the result on
    unjoined.
    """

    _EXTENTS_FROM = 4 << 20
    _MAX_EXTENTS = 4096  # past this the extents are joined into one buffer (many small writes)

    def __init__(self, data: bytes | Extents, name: str = "<memory>") -> None:
        super().__init__(b"", name)
        self._over: Extents | None = None
        self._changed = False
        if type(data) is Extents:  # an image judged as extents: its own copy to write over, never joined
            self.buf = b""  # type: ignore[assignment]
            self._over = data.copy()
            return
        # bytes until the first change (a caller's bytearray is copied: it must not change under us)
        self.buf = data if type(data) is bytes else bytes(data)  # type: ignore[assignment]

    def _writable(self) -> None:
        if type(self.buf) is bytes:
            self.buf = bytearray(self.buf)

    def _overlay(self) -> Extents | None:
        """The extents the writes go to, for a large image; None for a small one (copied on change)."""
        if self._over is None and type(self.buf) is bytes and len(self.buf) >= self._EXTENTS_FROM:
            self._over = Extents(self.buf)
        return self._over

    def pristine(self) -> bool:
        """Whether nothing was written or truncated yet (the file still holds the bytes it was made with)."""
        return not self._changed and type(self.buf) is bytes

    def _slice(self, offset: int, length: int) -> bytes:
        if self._over is not None:
            return self._over.read(offset, length)
        buf = self.buf
        if length >= _VIEW_SLICE_FROM and type(buf) is bytearray:
            # (a bytearray's slice is a bytearray, copied again into bytes; through a view, one copy:
            # 2.8 us instead of 4.9 for a 64 KiB table. The temporary views die at once, so the
            # buffer can still be resized.)
            return bytes(memoryview(buf)[offset:offset + length])
        return bytes(buf[offset:offset + length])

    def pread(self, offset: int, length: int) -> bytes:
        _check_range(self.name, offset, length)
        return self._slice(offset, length)

    def pwrite(self, offset: int, data: bytes, site: WriteSite = WriteSite.OTHER) -> None:
        buf = self.buf
        if type(buf) is bytearray and 0 <= offset and offset + len(data) <= len(buf):
            buf[offset:offset + len(data)] = data  # (a copy already, and the range inside it: nothing to check)
            return
        over = self._overlay()
        if over is None:
            self._writable()
            super().pwrite(offset, data, site)
            return
        self._changed = True  # (from the first attempt, as the copy on change is made then)
        _check_range(self.name, offset, len(data))
        end = offset + len(data)
        self._check_growth("write", offset, end)
        if not data:
            return
        over.grow(end)
        over.put(offset, end, bytes(data), 0)
        if len(over.parts) > self._MAX_EXTENTS:
            self._over = Extents(over.join())

    def _check_growth(self, op: str, offset: int, end: int) -> None:
        if self._over is None:
            super()._check_growth(op, offset, end)
        elif end > self._over.size and end > self.max_size:
            raise _io_error(self.name, op, offset, end - offset, errno.ENOSPC,
                            f"an in-memory file grows to at most {self.max_size:#x} bytes")

    def truncate(self, size: int) -> None:
        over = self._overlay()
        if over is None:
            self._writable()
            super().truncate(size)
            return
        self._changed = True
        _check_range(self.name, size, 0)
        self._check_growth("truncate", size, size)
        over.cut(size)
        over.grow(size)

    def size(self) -> int:
        return self._over.size if self._over is not None else len(self.buf)

    def getvalue(self) -> bytes:
        return as_bytes(self.frozen_image())

    def frozen_image(self) -> bytes | Extents:
        """The file's bytes now, as an immutable image: its bytes, or a copy of its extents (a large image, never
        joined: what the judge holds of a recovered image, and what a host-operation log starts from)."""
        if self._over is not None:
            return self._over.copy()
        return self.buf if type(self.buf) is bytes else bytes(self.buf)

    def contents(self) -> bytes | bytearray | Extents:
        """The file's bytes as they lie (its buffer, or its extents), for reading in place until it next changes."""
        return self._over if self._over is not None else self.buf

    def release(self) -> None:
        """Drop the buffer now. The image opened on this file sits in reference cycles (its
        table caches call back into it) that keep the file alive until a garbage collection;
        a recovery's written copy of a 2 MiB-cluster image is 20 MiB of that."""
        self.buf = b""  # type: ignore[assignment]
        self._over = None


class RecordingFile(CopyOnWriteFile):
    """A CopyOnWriteFile that notes the range of every read while `recording`, and every write and truncation, in order.

    What harness.targets.readmemo keys a check or a recovery by (the reads), and what it
    replays on another image (the writes: (offset, bytes); truncations: (size, None)).
    """

    def __init__(self, data: bytes, name: str = "<memory>") -> None:
        super().__init__(data, name)
        self.reads: list[tuple[int, int]] = []
        self.ops: list[tuple[int, bytes | None]] = []
        self.recording = True
        self.sized = False  # whether the run asked the file's size (then its results depend on it)

    def size(self) -> int:
        if self.recording:
            self.sized = True
        return super().size()

    def pread(self, offset: int, length: int) -> bytes:
        if self.recording:
            self.reads.append((offset, length))
        if offset < 0 or length < 0 or offset + length > INT64_MAX:
            return super().pread(offset, length)  # (raises the named range error)
        return self._slice(offset, length)

    def pwrite(self, offset: int, data: bytes, site: WriteSite = WriteSite.OTHER) -> None:
        super().pwrite(offset, data, site)
        self.ops.append((offset, bytes(data)))

    def truncate(self, size: int) -> None:
        super().truncate(size)
        self.ops.append((size, None))


class ReadOnlyFile(CopyOnWriteFile):
    """A crash image for read-only judging: any write is a finding, not a silent change."""

    def pwrite(self, offset: int, data: bytes, site: WriteSite = WriteSite.OTHER) -> None:
        raise ReadOnlyWrite(f"read-only open wrote {len(data)} bytes at {offset:#x} ({site})")

    def truncate(self, size: int) -> None:
        raise ReadOnlyWrite(f"read-only open truncated the image to {size}")


class RecordingReadOnlyFile(RecordingFile, ReadOnlyFile):
    """A ReadOnlyFile that notes the range of every read: what a read-only open's ReadPlan is keyed by."""


class _Opened:
    """An image a snapshot reader keeps open, released when the last function reading it goes.

    An open image sits in reference cycles (its caches and I/O helpers call back into it)
    that only the cyclic collector frees, with its file and the image bytes under it. The
    judge's memo keeps a reader while it keeps the image's facts; when it drops them, the
    reader's functions go by reference counting, and with them this holder, whose release
    breaks the cycles: on a nightly example with 4 KiB clusters every image left for the
    collector was a snapshot reader's (9,178 of them between collections).
    """

    __slots__ = ("img",)

    def __init__(self, img: Qcow2Image) -> None:
        self.img = img

    def __del__(self) -> None:
        self.img.release()


class ReadOnlyWrite(Exception):
    """A read-only open tried to change its file."""


class PythonTarget(Target):
    """Today's models/qcow2: the live image over a FaultInjectingFile; judging on in-memory copies."""

    name = "python"
    supports_snapshots = True

    def __init__(self) -> None:
        self._options = OpenOptions()
        self._ff: FaultInjectingFile | None = None
        self._inner: MemoryFile | None = None
        self.image: Qcow2Image | None = None

    def describe(self) -> str:
        return "qcrash models/qcow2 (pure Python)"

    # ---- the live image ------------------------------------------------------------------
    def create(self, config: Config) -> None:
        base = MemoryFile(name=IMAGE_NAME)
        Qcow2Image.create(base, config.virtual_size, version=config.version, cluster_size=config.cluster_size,
                          refcount_bits=config.refcount_bits, lazy_refcounts=config.lazy_refcounts)
        self._options = OpenOptions(CacheMode(config.cache_mode), None)
        self._attach(base)

    def _attach(self, inner: MemoryFile, base: Image | None = None) -> None:
        old = self.image
        self._inner = inner
        self._ff = FaultInjectingFile(inner, base=base)
        self.image = self._open_live()
        if old is not None:
            old.release()  # (closed or aborted before: its cycles and tables go now, not at a collection)

    def _open_live(self) -> Qcow2Image:
        return Qcow2Image.open(self.ff, cache_mode=self._options.cache_mode,
                               lazy_refcounts=self._options.lazy_refcounts)

    @property
    def ff(self) -> FaultInjectingFile:
        if self._ff is None:
            raise RuntimeError("PythonTarget: create() first")
        return self._ff

    @property
    def live(self) -> Qcow2Image:
        if self.image is None:
            raise RuntimeError("PythonTarget: create() first")
        return self.image

    @property
    def options(self) -> OpenOptions:
        return self._options

    @property
    def log(self) -> WriteLog:
        return self.ff.log

    def point(self) -> int:
        return self.ff.point()

    def write(self, offset: int, data: bytes) -> None:
        self.live.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.live.write_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self.live.discard(offset, length)

    def flush(self) -> None:
        self.live.flush()

    def read(self, offset: int, length: int) -> bytes:
        return self.live.read(offset, length)

    def reopen(self, cache_mode: str | None, lazy_refcounts: bool | None) -> None:
        old = self.live
        old.close()
        self._options = OpenOptions(
            CacheMode(cache_mode) if cache_mode is not None else self._options.cache_mode,
            lazy_refcounts if lazy_refcounts is not None else self._options.lazy_refcounts)
        self.image = self._open_live()
        old.release()

    def live_check(self) -> CheckSummary:
        # Like qemu-img check on an open image: write every cached table first.
        self.live.write_all_metadata()
        return summary(checkmod.check(self.ff))

    def live_repair(self, mode: str) -> CheckSummary:
        old = self.live
        old.close()
        fix = checkmod.Fix.ALL if mode == "all" else checkmod.Fix.LEAKS
        result = checkmod.repair(self.ff, fix)
        self.image = self._open_live()
        old.release()
        return summary(result)

    def close(self) -> None:
        self.live.close()

    def contents(self) -> bytes:
        assert self._inner is not None
        return self._inner.getvalue()

    def abort(self) -> None:
        self.live.abort()

    def release(self) -> None:
        """The example is over: the live image's tables and reference cycles go now, not at a collection
        (with 2 MiB clusters its file is tens of MiB). Its file's bytes stay readable (`contents`)."""
        if self.image is not None:
            self.image.release()

    def restart(self, image: Image) -> None:
        # The log starts from the judged image itself (the judge's memo holds it): not from a copy of
        # the live buffer, which with 2 MiB clusters was 20 MiB more held for the rest of the example.
        self._attach(MemoryFile(as_bytes(image), name=IMAGE_NAME), base=_image(image))

    # ---- internal snapshots ------------------------------------------------------------------
    def snapshot_create(self, name: str, *, date_sec: int = 0) -> tuple[str, ...]:
        img = self.live
        _refuse_overflow(lambda: snapshot.check_room(img, img.l1, "snapshot create"))
        snapshot.create(img, name, date_sec=date_sec)
        return shared_data_events(img)

    def snapshot_apply(self, name: str) -> tuple[str, ...]:
        img = self.live
        _refuse_overflow(lambda: snapshot.check_room(img, snapshot.snapshot_l1(img, name), "snapshot apply"))
        snapshot.apply(img, name)
        return shared_data_events(img)

    def snapshot_delete(self, name: str) -> tuple[str, ...]:
        img = self.live
        snapshot.delete(img, name=name)
        return shared_data_events(img)

    def snapshots(self, raw: Image, *, reuse: ReadMemo | None = None) -> SnapshotReader:
        """The snapshot reader; with `reuse`, its `read_many` is answered from read plans (as `read_only`'s)."""
        raw = _image(raw)
        opened = _Opened(Qcow2Image.open(CopyOnWriteFile(raw), readonly=True))  # (the readers hold this, not the image)
        names = tuple(sn.name for sn in snapshot.list_snapshots(opened.img))
        if reuse is None:
            many = lambda name, sectors: _snapshot_sectors(opened.img, name, sectors)  # noqa: E731
        else:
            many = lambda name, sectors: _snapshot_view(raw, name, sectors, reuse)  # noqa: E731
        return SnapshotReader(names, opened.img.geo.cluster_size,
                              lambda name, offset, length: snapshot.read(opened.img, name, offset, length), many)

    # ---- judging -----------------------------------------------------------------------------
    def inspect(self, raw: Image) -> HeaderInfo:
        try:
            hdr = read_header(CopyOnWriteFile(_image(raw)), writable=False, check_mode=True).header
        except Qcow2Error as exc:
            return HeaderInfo(error=str(exc))
        return HeaderInfo(hdr.incompatible_features)

    reuses_reads = True  # check and recover_checked take a readmemo.ReadMemo (`reuse`)
    judges_extents = True  # the judging functions take a large image as `Extents` (harness/crashstates/images.py)

    def check(self, raw: Image, *, past_eof: bool = False, reuse: ReadMemo | None = None) -> CheckSummary:
        raw = _image(raw)
        if reuse is None:
            return _check(CopyOnWriteFile(raw), past_eof)
        key = reuse.call_key("check", len(raw), past_eof)
        found = reuse.lookup(key, raw)
        if found is not None:
            result, ranges = found
        else:
            file = RecordingFile(raw)
            result = _check(file, past_eof)
            ranges = merged(file.reads)
            reuse.store(key, ranges, raw, result)
        reuse.note_check(raw, ranges)
        return result  # type: ignore[return-value]

    def read_only(self, raw: Image, sectors: Iterable[int], *, allocated: bool = True,
                  name: str = IMAGE_NAME, reuse: ReadMemo | None = None) -> ReadOnlyView:
        """The read-only open's view; with `reuse`, replayed from the read plan of an earlier image that agrees
        with this one wherever the open read its file (readmemo: a plan's guest data is re-sliced from `raw`)."""
        raw = _image(raw)
        if reuse is None:
            return _read_only(ReadOnlyFile(raw, name=name), raw, sectors, allocated, None)
        wanted = sectors if isinstance(sectors, frozenset) else frozenset(sectors)
        return _planned(reuse, ("read_only", wanted, allocated, name), raw, name,
                        lambda file, plan: _read_only(file, raw, wanted, allocated, plan))

    def recover(self, raw: Image, path: RecoveryPath, options: OpenOptions, *, record: bool = True,
                name: str = IMAGE_NAME) -> Recovery:
        rec = self.recover_checked(raw, path, options, record=record, name=name)[0]
        if type(rec.image) is Extents:  # (the seam's recovered image is bytes; only the judge's memo takes extents)
            rec = dataclasses.replace(rec, image=rec.image.join())
        return rec

    def recover_checked(self, raw: Image, path: RecoveryPath, options: OpenOptions, *, record: bool = True,
                        name: str = IMAGE_NAME, raw_check: CheckSummary | None = None,
                        reuse: ReadMemo | None = None, image_for=None) -> tuple[Recovery, CheckSummary | None]:
        """`recover`, plus `check(recovered, past_eof=True)` when the recovery already computed it (else None).

        The open path checks the image after closing it; when nothing is written after
        that check (no leak repair, no refcount past EOF dropped) its result is the
        recovered image's check, and the judge's memo need not check the same bytes again.
        `raw_check`, when given, is `check(raw)`: an open and close that wrote nothing leave
        the bytes `raw`, so the open path takes it instead of checking them again.
        With `reuse`, a recovery that read what an earlier one read is replayed (readmemo);
        `image_for` is then asked for its image by digest before the image is joined
        (`readmemo.replay_writes`). A large image (`Extents`, or bytes laid over as extents
        by its file) recovers to `Extents`.
        """
        raw = _image(raw)
        if reuse is None:
            return self._recover_checked(CopyOnWriteFile(raw, name=name), path, options, record, raw_check)
        check_ranges = reuse.check_reads(raw) if raw_check is not None else None
        if check_ranges is None:
            raw_check = None  # what that check read would not be in this recovery's read set
        key = reuse.call_key("recover", len(raw), path, options, record, name)
        found = reuse.lookup(key, raw)
        if found is not None:
            return _replayed_recovery(raw, record, found[0], image_for)  # type: ignore[arg-type]
        inner = RecordingFile(raw, name=name)
        inner.recording = False  # (the log's copy of the base is not a read of the recovery)
        rec, known = self._recover_checked(inner, path, options, record, raw_check, recording=True, reuse=reuse)
        ranges = merged(inner.reads)
        if check_ranges:
            ranges = union(ranges, check_ranges)
        replay = (rec.messages, rec.events, rec.error, tuple(inner.ops),
                  tuple(rec.log.ops) if rec.log is not None else None, known)
        reuse.store(key, ranges, raw, replay, sum(len(d) for _o, d in inner.ops if d))
        return rec, known

    def _recover_checked(self, inner: CopyOnWriteFile, path: RecoveryPath, options: OpenOptions, record: bool,
                         raw_check: CheckSummary | None, *, recording: bool = False,
                         reuse: ReadMemo | None = None) -> tuple[Recovery, CheckSummary | None]:
        file: BlockFile = FaultInjectingFile(inner) if record else inner
        if recording:
            inner.recording = True  # type: ignore[attr-defined]
        messages: list[str | checkmod.Finding] = []  # a repair's lines stay Findings (checkmod.Lines)
        events: list[str] = []
        known: list[CheckSummary] = []
        try:
            _RECOVER[path](file, options, messages, events, known,
                           raw_check if raw_check is not None and not raw_check.refcounts_past_eof else None,
                           inner.pristine, lambda: _final_check(file, inner, reuse if recording else None))
        except (RepairFailed, Qcow2Error) as exc:
            inner.release()
            return Recovery(None, None, checkmod.Lines(messages), tuple(events), f"{type(exc).__name__}: {exc}"), None
        if recording:
            inner.recording = False  # type: ignore[attr-defined]
        log = file.log if isinstance(file, FaultInjectingFile) else None
        image = inner.frozen_image()
        inner.release()
        return Recovery(image, log, checkmod.Lines(messages), tuple(events)), (known[0] if known else None)


def _check(file: CopyOnWriteFile, past_eof: bool) -> CheckSummary:
    result = checkmod.check(file)
    return summary(result, tuple(checkmod.refcounts_past_eof(file)) if past_eof else ())


_FINAL_CHECK_MEMO_FROM = 256 << 10  # image bytes below which checking costs less than keying the check


def _final_check(file: BlockFile, inner: CopyOnWriteFile, reuse: ReadMemo | None) -> CheckSummary:
    """`check(file)` of a recovery's final bytes; with `reuse`, from an earlier such check that read what they hold.

    The crashes of one recovery mostly recover to the bytes the first recovery left, and
    each recovery checks its result again: on a 512-byte-cluster nightly example half of
    these checks were of bytes checked before. The check writes nothing (Fix.NONE), so a
    replayed one leaves the file and its host-operation log as the check would; its reads
    are noted as the check would have made them (the recovery's own read set).
    """
    if reuse is None or not isinstance(inner, RecordingFile) or inner.size() < _FINAL_CHECK_MEMO_FROM:
        return summary(checkmod.check(file))
    data = inner.contents()  # (not a read of the recovery, and not a copy: hashed where it lies)
    key = reuse.call_key("final check", inner.name, inner.size())
    found = reuse.lookup(key, data)
    if found is not None:
        inner.reads.extend(found[1])
        return found[0]  # type: ignore[return-value]
    start = len(inner.reads)
    result = summary(checkmod.check(file))
    reuse.store(key, merged(inner.reads[start:]), data, result)
    return result


def _replayed_recovery(raw: Image, record: bool, replay: tuple, image_for=None) -> tuple[Recovery, CheckSummary | None]:
    """A recovery of `raw` rebuilt from an earlier one that read the same bytes (readmemo): same lines, events,
    error and check; its writes applied to `raw`; its host-operation log over `raw`."""
    messages, events, error, ops, log_ops, known = replay
    if error is not None:
        return Recovery(None, None, messages, events, error), None
    log = None
    if record:
        log = WriteLog(raw)
        for op in log_ops:
            log.append(op.kind, op.offset, op.data, op.site, op.size_after)
    # (as the recovery's own CopyOnWriteFile would: a large image's writes laid over it as extents, handed on so)
    keep = type(raw) is Extents or len(raw) >= CopyOnWriteFile._EXTENTS_FROM
    return Recovery(replay_writes(raw, ops, image_for, keep_extents=keep), log, messages, events), known


def _recover_open(file: BlockFile, options: OpenOptions, messages: list, events: list[str],
                  known: list[CheckSummary], raw_check: CheckSummary | None, pristine: Callable[[], bool],
                  final_check: Callable[[], CheckSummary]) -> None:
    rebuilt: list[bool] = []
    texts: list[str] = []  # the lines logged as text (not the repair's)

    def log(line: str) -> None:
        messages.append(line)
        texts.append(line)

    def on_repair(result: checkmod.CheckResult) -> None:
        messages.extend(result.findings)  # where the repair's lines were logged, in the same order
        rebuilt.append(result.rebuilt)  # (a rebuild prints "Rebuilding refcount structure")

    img = Qcow2Image.open(file, cache_mode=options.cache_mode, lazy_refcounts=options.lazy_refcounts,
                          log=log, on_repair=on_repair)
    img.close()
    img.release()
    # The file still holds the raw bytes (nothing was written): their check is known.
    result = raw_check if raw_check is not None and pristine() else final_check()
    final = True
    # Leaks only, or corruptions that are all a COPIED flag a snapshot operation's crash left
    # out of step and that `check -r leaks` repairs fully (CRASH-CONTRACT.md, Snapshots).
    if (result.leaks or result.corruptions) and not result.check_errors and (
            not result.corruptions or result.copied_benign):
        # `qemu-img check -r leaks` without its "Double checking the fixed image now...": that
        # pass reads and writes nothing the recovery keeps (its result was dropped here, and
        # the judge checks the recovered image itself, past EOF included), and it was a third
        # of this repair, the dearest step of a 512-byte-cluster nightly example's recoveries.
        checkmod.check(file, checkmod.Fix.LEAKS, double_check=_LEAK_REPAIR_DOUBLE_CHECK)
        events.append("leaks repaired")
        final = False
    if _drop_past_eof(file, events):
        final = False
    if final:  # the file is unchanged since the check, and nothing lies past EOF
        known.append(result)
    if any(rebuilt) or any("Rebuilding refcount structure" in m for m in texts):
        events.append("refcount rebuild")
    if messages:
        events.append("repaired on open")


# Whether the open path's leak repair runs qemu-img's re-check too (the differential test's reference runs do).
_LEAK_REPAIR_DOUBLE_CHECK = False


def _recover_check(fix: checkmod.Fix):
    def run(file: BlockFile, options: OpenOptions, messages: list[str], events: list[str],
            _known: list[CheckSummary], _raw_check: CheckSummary | None, _pristine: Callable[[], bool],
            _final_check: Callable[[], CheckSummary]) -> None:
        result = checkmod.repair(file, fix)
        messages.extend(result.findings)
        if result.error is not None:
            raise RepairFailed(f"{file.name}: check -r failed: {result.error}")
        _drop_past_eof(file, events)
    return run


def _drop_past_eof(file: BlockFile, events: list[str]) -> bool:
    # qcrash's deviation (CRASH-CONTRACT.md): refcounts past EOF are invisible to qemu-img
    # check but break the contract, so every recovery path drops them.
    if checkmod.drop_refcounts_past_eof(file):
        events.append("refcounts past EOF dropped")
        return True
    return False


_RECOVER = {
    RecoveryPath.OPEN: _recover_open,
    RecoveryPath.CHECK_ALL: _recover_check(checkmod.Fix.ALL),
    RecoveryPath.CHECK_LEAKS: _recover_check(checkmod.Fix.LEAKS),
}


def _refuse_overflow(probe) -> None:
    """Run a snapshot refcount-room probe; its refusal (nothing written yet) becomes the seam's SnapshotRefused."""
    try:
        probe()
    except snapshot.SnapshotRefused as exc:
        raise SnapshotRefused(str(exc)) from exc


def summary(result: checkmod.CheckResult, past_eof: tuple[int, ...] = ()) -> CheckSummary:
    return CheckSummary(result.corruptions, result.leaks, result.check_errors, result.corruptions_fixed,
                        result.leaks_fixed, result.lines, past_eof,
                        bool(result.corruptions) and benign_copied(result))


def allocated_sectors(clusters: Iterable[int], cluster_size: int, size: int) -> set[int]:
    """Every sector of the given guest clusters, clipped to the virtual size."""
    per_cluster, limit = cluster_size // SECTOR, size // SECTOR
    if per_cluster == 1:  # (512-byte clusters: thousands of one-sector ranges)
        return {first for guest in clusters if (first := guest // SECTOR) < limit}
    out: set[int] = set()
    for guest in clusters:
        first = guest // SECTOR
        out.update(range(first, min(first + per_cluster, limit)))
    return out


def _read_only(file: ReadOnlyFile, raw: bytes, sectors: Iterable[int], allocated: bool,
               plan: ReadPlan | None) -> ReadOnlyView:
    try:
        img = Qcow2Image.open(file, readonly=True)
        try:
            wanted = set(sectors)
            clusters: tuple[int, ...] = ()
            if allocated:
                clusters = tuple(img.allocated_guest_clusters())
                wanted |= allocated_sectors(clusters, img.geo.cluster_size, img.size)
            return ReadOnlyView(read_sectors(img, sorted(wanted), raw, plan), clusters)
        finally:
            img.release()
    except ReadOnlyWrite as exc:
        return ReadOnlyView(changed=str(exc))
    except Qcow2Error as exc:
        return ReadOnlyView(error=str(exc))


def _planned(reuse: ReadMemo, parts: tuple, raw: bytes, name: str, read) -> ReadOnlyView:
    """`read(file, plan)` on a recording file over `raw`, or its ReadPlan replayed on `raw` when an earlier image read
    alike (readmemo). A read that raises is not memoised.

    Keyed by the file's size only when the read asked for it: one that did not depends on
    the bytes it read alone, and crash images of one sweep differ in size.
    """
    keys = [reuse.call_key(*parts, size) for size in (None, len(raw))]
    for key in keys:
        found = reuse.lookup(key, raw)
        if found is not None:
            return found[0].replay(raw)  # type: ignore[attr-defined]
    file = RecordingReadOnlyFile(raw, name=name)
    plan = ReadPlan()
    view = plan.finish(read(file, plan))
    reuse.store(keys[file.sized], merged(file.reads), raw, plan, plan.weight)
    return view


def _snapshot_view(raw: bytes, name: str, sectors: list[int], reuse: ReadMemo) -> dict[int, bytes]:
    """A snapshot's sectors, as `_snapshot_sectors` reads them, from a read plan when an earlier image read alike.

    The snapshot's L1 is swapped in on an image opened on a recording file; what it reads
    (header, snapshot table, the snapshot's L1 and L2 tables) keys the plan, and its
    plain data clusters are sliced from `raw` (`read_sectors`' path). A failed read raises
    as `_snapshot_sectors` does.
    """
    def read(file: ReadOnlyFile, plan: ReadPlan) -> ReadOnlyView:
        img = Qcow2Image.open(file, readonly=True)
        try:
            return ReadOnlyView(_snapshot_sectors(img, name, sectors, raw, plan))
        finally:
            img.release()

    # (the file is named as `snapshots` names its image: errors read alike)
    return _planned(reuse, ("snapshot", name, tuple(sectors)), raw, "<memory>", read).sectors


class ReadPlan:
    """Where a read-only open's guest data came from, to be re-read from another image that agrees on its metadata.

    Every piece of a run is either a slice of the image bytes taken straight from `raw`
    (host offset, length: the data the open read without asking its file) or bytes the
    open got otherwise (zeros, or a read through its file, which is in the read set and so
    the same on any image the plan is replayed on). The open's decisions (which entries,
    which clusters, errors) all came from file reads, so an image that agrees with the
    recorded one on every read range gets the same plan; only the raw slices differ.
    """

    __slots__ = ("runs", "_pieces", "_digests", "view", "weight")

    def __init__(self) -> None:
        self.runs: list[tuple[int, int, tuple]] = []  # (first sector, sectors, pieces)
        self._pieces: list[tuple[int, int | bytes]] = []
        self._digests: list[bytes] = []  # each run's `run_digest` as the recorded open read it
        self.view: ReadOnlyView | None = None  # an error or a refused write: replayed as it is
        self.weight = 0

    def piece(self, host: int, data: int | bytes) -> None:
        """A piece of the current run: `raw[host:host+data]` (zero-padded past the end), `data` zero bytes (host
        ZEROS) or the bytes `data` (host CONST)."""
        self._pieces.append((host, data))

    def end_run(self, first: int, count: int, digest: bytes) -> None:
        """Close the current run: sectors [first, first + count), whose bytes hash to `digest` (`run_digest`)."""
        self.runs.append((first, count, tuple(self._pieces)))
        self._digests.append(digest)
        self.weight += 64 + 32 * len(self._pieces) + sum(len(d) for h, d in self._pieces if h == CONST)
        self._pieces = []

    def finish(self, view: ReadOnlyView) -> ReadOnlyView:
        """Keep what a replay needs of the recorded open's `view`; return `view`, with its fingerprint when it read."""
        if view.changed is not None or view.error is not None:
            self.runs, self.view = [], view
            return view
        self.view = dataclasses.replace(view, sectors={})
        return dataclasses.replace(view, fingerprint=self._fingerprint(self._digests))

    def _fingerprint(self, digests: list[bytes]) -> bytes:
        """ReadOnlyView.fingerprint of a view made of this plan's runs with these bytes' digests.

        The runs are the sorted sectors cut where they break or reach 4,096 (`read_sectors`),
        so a view's runs are a function of its sectors: equal fingerprints, equal places and bytes.
        """
        h = xxhash.xxh3_128()
        for (first, count, _p), digest in zip(self.runs, digests):
            h.update(_RUN_PLACE.pack(first, count))
            h.update(digest)
        return h.digest()

    def replay(self, raw: bytes) -> ReadOnlyView:
        assert self.view is not None
        if not self.runs and (self.view.changed is not None or self.view.error is not None):
            return self.view
        last = _LAST_REPLAYS.get(self)
        runs: list[tuple[bytes, list[bytes], bytes]] = []  # (bytes, sector objects, run_digest)
        changed: list[int] = []  # the runs that read otherwise than last time
        for k, (_first, _count, pieces) in enumerate(self.runs):
            if len(pieces) == 1:
                data = _piece(raw, *pieces[0])
            else:
                data = b"".join([_piece(raw, h, d) for h, d in pieces])
            if last is not None and last[1][k][0] == data:
                runs.append(last[1][k])  # this run reads as it did last time: the same sector objects
            else:
                runs.append((data, split_sectors(data), run_digest(data)))
                changed.append(k)
        if last is not None and not changed:
            return dataclasses.replace(self.view, sectors=last[0], fingerprint=last[2])
        # (the last view's dict, copied in C, holds every sector of this plan: only the changed runs are set again)
        out: dict[int, bytes] = last[0].copy() if last is not None else {}
        for k in changed:
            first, count, _p = self.runs[k]
            out.update(zip(range(first, first + count), runs[k][1]))
        fingerprint = self._fingerprint([run[2] for run in runs])
        _LAST_REPLAYS.put(self, (out, runs, fingerprint), 2 * SECTOR * len(out))  # (each run's bytes and its sectors)
        return dataclasses.replace(self.view, sectors=out, fingerprint=fingerprint)


class _LastReplays:
    """The last view each of a few read plans replayed (its sector dict, and each run's bytes and sector objects).

    Consecutive crash images of one sweep mostly read alike where a plan reads guest data:
    a replay that reads every run as the plan's last one did hands back that very dict, and
    one that differs in a few runs reuses the other runs' sector objects. The judge then
    compares and drops views whose sectors are shared objects, not fresh copies (a dict
    compare of the same objects is an identity test per sector). Views are never mutated
    (harness/imagememo.py), so sharing them is safe. Bounded by plans and by bytes.
    """

    MAX_PLANS = 8
    MAX_BYTES = 16 << 20

    def __init__(self) -> None:
        self._held: OrderedDict[ReadPlan, tuple[tuple, int]] = OrderedDict()  # (plans hash by identity)
        self._bytes = 0

    def get(self, plan: ReadPlan):
        held = self._held.get(plan)
        if held is None:
            return None
        self._held.move_to_end(plan)
        return held[0]

    def put(self, plan: ReadPlan, value: tuple, size: int) -> None:
        old = self._held.pop(plan, None)
        if old is not None:
            self._bytes -= old[1]
        if size > self.MAX_BYTES // 2:
            return
        self._held[plan] = (value, size)
        self._bytes += size
        while len(self._held) > self.MAX_PLANS or self._bytes > self.MAX_BYTES:
            _plan, (_value, dropped) = self._held.popitem(last=False)
            self._bytes -= dropped


_LAST_REPLAYS = _LastReplays()


_RUN_PLACE = struct.Struct("<QQ")  # a run's first sector and count, in a view's fingerprint


def run_digest(data: bytes) -> bytes:
    """The digest of one run's bytes in a view's fingerprint (XXH3-128, as the image memo's)."""
    return xxhash.xxh3_128_digest(data)


ZEROS, CONST = -2, -1  # ReadPlan pieces that are not slices of the image: `n` zero bytes, or given bytes


def _piece(raw: bytes, host: int, data: int | bytes) -> bytes:
    if host < 0:
        return bytes(data) if host == ZEROS else data  # type: ignore[return-value, arg-type]
    chunk = raw[host:host + data]  # type: ignore[operator]
    if len(chunk) < data:  # past the end of the file reads zeros (read_exact)
        chunk += bytes(data - len(chunk))  # type: ignore[operator]
    return chunk


def read_sectors(img: Qcow2Image, sectors: list[int], raw: bytes | None = None,
                 plan: ReadPlan | None = None) -> dict[int, bytes]:
    """Read sorted sectors, one guest read per contiguous run (at most 4096 sectors), as `img.read` reads them.

    With `raw`, the bytes of `img`'s (read-only) file, a run is read from one L2 table
    lookup per table: unallocated clusters and host-contiguous plain data clusters are
    taken straight from `raw`, and every other entry goes through the image's own
    `_lookup`, so errors, zero clusters and injected read bugs behave exactly as in
    `img.read`. (The judge reads every allocated sector of every crash image: with
    512-byte clusters this was a fifth of a dev run.)
    """
    out: dict[int, bytes] = {}
    for i, j in sector_runs(sectors, 4096):
        offset, length = sectors[i] * SECTOR, (j - i) * SECTOR
        if raw is None:
            data = img.read(offset, length)
        else:
            img._check_request(offset, length, "read")
            data = _read_run(img, raw, offset, length, plan)
            if plan is not None:
                plan.end_run(sectors[i], j - i, run_digest(data))
        out.update(zip(sectors[i:j], split_sectors(data)))
    return out


def _snapshot_sectors(img: Qcow2Image, name: str, sectors: list[int], raw: bytes | None = None,
                      plan: ReadPlan | None = None) -> dict[int, bytes]:
    """Sectors of a snapshot through its L1, one guest read per run (as `snapshot.read` swaps the L1 in).

    With `raw`, the bytes of `img`'s read-only file, by `read_sectors`' path over them (and
    into `plan`): the snapshot's L2 tables found through the swapped-in L1, their plain
    clusters sliced from `raw`, every other entry through the image's own lookup."""
    with snapshot.loaded(img, name):
        return read_sectors(img, sectors, raw, plan)


def _read_run(img: Qcow2Image, raw: bytes, offset: int, length: int, plan: ReadPlan | None = None) -> bytes:
    """Guest bytes [offset, offset+length) of a read-only image whose file holds `raw` (see `read_sectors`).

    The run's pieces (views of `raw`, shared zeros, bytes read through the file) are
    joined once: each piece used to be copied out of `raw`, into a buffer, and the
    buffer into bytes (a 2 MiB run three times over)."""
    cs = img.geo.cluster_size
    per_l2 = img.geo.l2_entries
    parts: list = []
    pos, end = offset, offset + length
    # (an image as Extents is sliced as it is: each slice a copy of what it covers)
    with (contextlib.nullcontext(raw) if type(raw) is Extents else memoryview(raw)) as view:
        while pos < end:
            cluster = pos // cs
            l1_index = cluster // per_l2
            seg_end = min(end, (l1_index + 1) * per_l2 * cs)  # the part of the run this L2 table maps
            l2_off = img._l2_table_offset(l1_index)
            table = img.l2cache.get(l2_off) if l2_off else None
            if table is None:
                _zeros(parts, seg_end - pos)
                if plan is not None:
                    plan.piece(ZEROS, seg_end - pos)
            else:
                first = cluster - l1_index * per_l2
                last = (seg_end - 1) // cs - l1_index * per_l2
                entries = array.array("Q", bytes(table[first * 8:(last + 1) * 8]))
                if sys.byteorder == "little":
                    entries.byteswap()
                _read_segment(img, view, pos, seg_end, entries, plan, parts)
            pos = seg_end
        try:
            return b"".join(parts)
        finally:
            parts.clear()  # (the views into `raw` go before it is released)


_ZERO_RUN = bytes(1 << 21)
_ZERO_VIEWS: dict[int, memoryview] = {}  # views of _ZERO_RUN by length (a few cluster and run sizes)


def _zeros(parts: list, n: int) -> None:
    """Append `n` zero bytes to `parts` (views of one shared zero buffer)."""
    while n > 0:
        k = min(n, len(_ZERO_RUN))
        piece = _ZERO_VIEWS.get(k)
        if piece is None:
            piece = memoryview(_ZERO_RUN)[:k]
            if len(_ZERO_VIEWS) < 64:
                _ZERO_VIEWS[k] = piece
        parts.append(piece)
        n -= k


def _raw_piece(parts: list, view: memoryview | Extents, start: int, n: int) -> None:
    """Append raw[start:start+n] to `parts`, zero-padded past the end of the file (read_exact)."""
    chunk = view[start:start + n]
    parts.append(chunk)
    if len(chunk) < n:
        _zeros(parts, n - len(chunk))


def _read_segment(img: Qcow2Image, view: memoryview, pos: int, end: int, entries: array.array,
                  plan: ReadPlan | None, parts: list) -> None:
    """Append guest bytes [pos, end) to `parts`, all mapped by one L2 table whose entries for those clusters are `entries`."""
    cs = img.geo.cluster_size
    # A NORMAL entry: no compressed bit, no zero flag (v3; bit 0 is reserved in v2), an
    # aligned non-zero host offset. Such an entry is read as `_lookup` would, without it.
    special = not_normal_flags(img.hdr.version)
    offset_mask = spec.L2E_OFFSET_MASK
    if entries.count(0) == len(entries):  # nothing allocated
        if plan is not None:
            plan.piece(ZEROS, end - pos)
        _zeros(parts, end - pos)
        return
    e0 = entries[0]
    host0 = e0 & offset_mask
    last = e0 + (len(entries) - 1) * cs
    if not e0 & special and host0 and not host0 & (cs - 1) and last < 1 << 64 \
            and entries == array.array("Q", range(e0, last + 1, cs)):
        # Every entry NORMAL (the same flags as the first) and their clusters contiguous in the file.
        start = host0 + pos % cs
        if plan is not None:
            plan.piece(start, end - pos)
        _raw_piece(parts, view, start, end - pos)
        return
    count = len(entries)
    i = 0
    while i < count:
        entry = entries[i]
        in_off = pos % cs
        host = entry & offset_mask
        if entry == 0 or (not entry & special and host and not host & (cs - 1)):
            # A run of unallocated entries, or of NORMAL entries whose clusters follow each
            # other in the file, is one piece: with 512-byte clusters the file interleaves
            # data with refcount blocks and L2 tables, so a segment is a few runs, not one, and
            # taking them entry by entry was most of a read-only open after a long write.
            j = i + 1
            if entry == 0:
                while j < count and entries[j] == 0:
                    j += 1
            elif host + count * cs <= offset_mask:  # (no carry out of the offset bits: same flags throughout)
                nxt = entry + cs
                while j < count and entries[j] == nxt:
                    j += 1
                    nxt += cs
            n = min((j - i) * cs - in_off, end - pos)
            if entry == 0:
                _zeros(parts, n)
                if plan is not None:
                    plan.piece(ZEROS, n)
            else:
                if plan is not None:
                    plan.piece(host + in_off, n)
                _raw_piece(parts, view, host + in_off, n)
            pos += n
            i = j
            continue
        n = min(cs - in_off, end - pos)
        i += 1
        _entry, ctype, host = img._lookup(pos)
        if ctype is ClusterType.NORMAL or (ctype is ClusterType.ZERO_ALLOC and inject.on("stale-l2-entry-read")):
            got = read_exact(img.file, host + in_off, n)  # (a file read: in the read set)
            if plan is not None:
                plan.piece(CONST, got)
            parts.append(got)
        else:
            _zeros(parts, n)
            if plan is not None:
                plan.piece(ZEROS, n)  # (a zero cluster: not held, a 2 MiB one least of all)
        pos += n
