"""The target seam: the one interface through which the runner drives and judges "the implementation under test"."""

# Two halves, kept apart on purpose:
#
# * the LIVE image (create, guest operations, reopen, live check/repair, close, abort,
#   restart) records every host operation in a `harness.faultfile.WriteLog`; `point()` is
#   the current crash point, so the runner brackets each guest operation with two points
#   and builds crash images from the log with `harness.crashstates.CrashImageBuilder`
#   (every crash policy applies to every target unchanged);
# * JUDGING (inspect, check, read_only, recover) takes crash image BYTES and nothing of
#   the live image: each call is a pure function of its arguments, so a later cache may
#   key it on the image's hash. Expected outcomes (an unopenable image, a read-only open
#   that writes, a failed repair) come back as data; anything else the implementation
#   does wrong raises, and the runner reports it as an unexpected exception.

from __future__ import annotations

import abc
import enum
import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from harness.config import Config
from harness.errors import QcrashError
from harness.faultfile import WriteLog
from models.blockio import CacheMode
from models.qcow2.spec import CORRUPT_BIT, DIRTY_BIT

__all__ = [
    "CheckSummary", "HeaderInfo", "OpenOptions", "ReadOnlyView", "Recovery", "RecoveryPath", "SnapshotReader",
    "SnapshotRefused", "Target", "TargetError", "UnknownTarget", "get_target", "register_target", "target_names",
]


class TargetError(Exception):
    """The implementation under test could not do what the runner asked (not a contract verdict by itself)."""


class UnknownTarget(TargetError, QcrashError):
    """`get_target` was given a name no target is registered under."""


class SnapshotRefused(TargetError):
    """A snapshot operation the implementation refuses before writing anything: both sides skip it."""


class RecoveryPath(enum.StrEnum):
    """The ways a user brings a crashed image back; each crash state is recovered by one and the choice recorded."""

    # Open read-write (the implementation repairs a dirty image on open), close, and when
    # `check` then reports leaks only, `check -r leaks`: what the python runner always did.
    OPEN = "open"
    CHECK_ALL = "check-all"  # qemu-img check -r all
    CHECK_LEAKS = "check-leaks"  # qemu-img check -r leaks


@dataclass(frozen=True, slots=True)
class OpenOptions:
    """How the live image is opened, and how recovery opens a crash image (None: as the header says)."""

    cache_mode: CacheMode = CacheMode.WRITEBACK
    lazy_refcounts: bool | None = None


@dataclass(frozen=True, slots=True)
class HeaderInfo:
    """The raw image's header bits as read without opening it, or why it cannot be read."""

    incompatible_features: int = 0
    error: str | None = None  # the implementation refuses the header (message names the rule)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & DIRTY_BIT)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & CORRUPT_BIT)


@dataclass(frozen=True, slots=True)
class CheckSummary:
    """What `qemu-img check` (or the live check/repair) reported.

    The counters are qemu-img's (as models.qcow2.check.CheckCounts holds them for the python
    checker), restated here so the seam depends on no implementation: the qemu target fills
    them from qemu-img's JSON.
    """

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    messages: Sequence[str] = ()  # a tuple, or lines formatted when read (models.qcow2.check.Lines); compare with ==
    # qcrash's stricter rule (CRASH-CONTRACT.md): clusters past EOF with a nonzero refcount.
    # Filled only when asked (`check(raw, past_eof=True)`, on recovered images: on a raw crash
    # image the tables may point anywhere).
    refcounts_past_eof: tuple[int, ...] = ()
    # Every corruption is a COPIED flag out of step in the harmless direction that
    # `check -r leaks` repairs fully (what a crash inside a snapshot operation may leave;
    # CRASH-CONTRACT.md, Snapshots). Targets that cannot tell leave it False.
    copied_benign: bool = False

    @property
    def problems(self) -> bool:
        """Corruptions, leaks or check errors remain."""
        return bool(self.corruptions or self.leaks or self.check_errors)

    def text(self) -> str:
        head = f"check: {self.corruptions} corruptions, {self.leaks} leaks, {self.check_errors} check errors"
        if self.messages:
            head += "; " + "; ".join(self.messages[:4])
        return head


@dataclass(frozen=True, slots=True)
class ReadOnlyView:
    """A read-only open of an image and what it read, sector number -> 512 bytes."""

    sectors: dict[int, bytes] = field(default_factory=dict)
    allocated: tuple[int, ...] = ()  # guest offsets of allocated clusters (foreign data hides there)
    changed: str | None = None  # the read-only open tried to change the file: what it did
    error: str | None = None  # the read-only open failed: the implementation's message
    # Optional: a digest of `sectors` the target computed on the side (XXH3-128 over each run of
    # consecutive sectors it read: the run's place and the digest of its bytes). Two views whose
    # fingerprints are equal hold equal sectors (the image memo's collision argument); None, or
    # unequal fingerprints, say nothing: compare the sectors. (Not part of a view's equality.)
    fingerprint: bytes | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class SnapshotReader:
    """The internal snapshots of an image (bytes), opened read-only: their names and their guest data."""

    names: tuple[str, ...]
    cluster_size: int
    read: Callable[[str, int, int], bytes]  # (name, offset, length) -> guest bytes of that snapshot
    # Optional: (name, ascending sectors) -> sector -> 512 bytes, the same bytes `read` gives
    # sector by sector, read in runs (the judge's fast path; None: only `read`).
    read_many: Callable[[str, list[int]], dict[int, bytes]] | None = None


@dataclass(frozen=True, slots=True)
class Recovery:
    """The outcome of recovering one crash image by one path."""

    image: bytes | None  # the recovered image; None when the recovery failed
    log: WriteLog | None = None  # the recovery's own host operations (to crash the recovery), if recorded
    messages: Sequence[str] = ()  # what the implementation printed while recovering (as CheckSummary.messages)
    events: tuple[str, ...] = ()  # coverage labels of what happened ("leaks repaired", ...), counted as reached
    error: str | None = None  # why the recovery failed (the image could not be brought back)


class Target(abc.ABC):
    """The implementation under test: one live image plus pure judging functions over image bytes.

    The live image lives from `create` to `close`/`abort`; `restart` replaces it (after a
    crash the runner continues on the recovered image) and starts a fresh log.
    """

    name: str = ""
    # Whether the judging functions (inspect, check, read_only, snapshots, recover) also take a large
    # image as `harness.crashstates.images.Extents`, read where its bytes lie; the judge's memo
    # joins it first for a target that does not (harness/imagememo.py).
    judges_extents: bool = False

    # ---- description ---------------------------------------------------------------------
    @abc.abstractmethod
    def describe(self) -> str:
        """The implementation and its version, for reports and reproducers."""

    # ---- the live image ------------------------------------------------------------------
    @abc.abstractmethod
    def create(self, config: Config) -> None:
        """Create a fresh image for `config` and open it with the configuration's cache mode."""

    @property
    @abc.abstractmethod
    def options(self) -> OpenOptions:
        """The options the live image is open with (recovery opens crash images the same way)."""

    @property
    @abc.abstractmethod
    def log(self) -> WriteLog:
        """The host operations since `create` / `restart`, with the image they started from as base."""

    def point(self) -> int:
        """The current crash point: the number of host operations recorded."""
        return len(self.log)

    @abc.abstractmethod
    def write(self, offset: int, data: bytes) -> None: ...

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    def discard(self, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    def flush(self) -> None: ...

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def reopen(self, cache_mode: str | None, lazy_refcounts: bool | None) -> None:
        """Close and open again with changed options (None keeps the current one)."""

    @abc.abstractmethod
    def live_check(self) -> CheckSummary:
        """Check the open image as `qemu-img check` on an image in use (cached tables written first)."""

    @abc.abstractmethod
    def live_repair(self, mode: str) -> CheckSummary:
        """Close, `check -r <mode>` ("all" or "leaks"), open again; what the repair reported (fixed counts included)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close cleanly (write back, clear the dirty bit)."""

    @abc.abstractmethod
    def contents(self) -> bytes:
        """The image file's current bytes (after `close`: the cleanly closed image)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Stop at once, as at a crash: no write-back, no flush."""

    @abc.abstractmethod
    def restart(self, image: bytes) -> None:
        """Continue on `image` (a recovered crash image), opened with the current options; the log starts afresh."""

    # ---- internal snapshots (optional: the default refuses by name) ----------------------------
    # Whether the snapshot methods below are implemented; the fuzz engine leaves snapshot ops
    # out of sequences for a target without them (today: qemu), instead of reporting refusals.
    supports_snapshots: ClassVar[bool] = False

    # Each live operation returns coverage labels of what it reached, and raises
    # SnapshotRefused, before writing anything, for an operation the implementation refuses.
    def snapshot_create(self, name: str, *, date_sec: int = 0) -> tuple[str, ...]:
        """`qemu-img snapshot -c NAME` on the live image."""
        raise self._unsupported("snapshot create")

    def snapshot_apply(self, name: str) -> tuple[str, ...]:
        """`qemu-img snapshot -a NAME` on the live image."""
        raise self._unsupported("snapshot apply")

    def snapshot_delete(self, name: str) -> tuple[str, ...]:
        """`qemu-img snapshot -d NAME` on the live image."""
        raise self._unsupported("snapshot delete")

    def snapshots(self, raw: bytes) -> SnapshotReader:
        """Judging: the snapshots of image bytes, read-only."""
        raise self._unsupported("reading internal snapshots")

    def _unsupported(self, what: str) -> TargetError:
        return TargetError(f"{what} is not supported by the {self.name or type(self).__name__} target")

    # ---- judging: pure functions of image bytes -----------------------------------------------
    @abc.abstractmethod
    def inspect(self, raw: bytes) -> HeaderInfo:
        """The header's flags without opening the image, or the error that refuses it."""

    @abc.abstractmethod
    def check(self, raw: bytes, *, past_eof: bool = False) -> CheckSummary:
        """`qemu-img check` (no repair) of the image; with `past_eof`, also fill `refcounts_past_eof`."""

    @abc.abstractmethod
    def read_only(self, raw: bytes, sectors: Iterable[int], *, allocated: bool = True) -> ReadOnlyView:
        """Open read-only and read `sectors` (with `allocated`, also every sector of every allocated guest cluster)."""

    @abc.abstractmethod
    def recover(self, raw: bytes, path: RecoveryPath, options: OpenOptions, *, record: bool = True) -> Recovery:
        """Recover a crash image by `path`; with `record`, also return the recovery's host-operation log."""


# ---- the registry ---------------------------------------------------------------------------------
# name -> "module:Class" (imported on first use, so the python target never imports QEMU
# plumbing) or a factory registered at run time.
_REGISTRY: dict[str, str | Callable[..., Target]] = {
    "python": "harness.targets.python:PythonTarget",
    "qemu": "harness.targets.qemu:QemuTarget",
}


def register_target(name: str, factory: Callable[..., Target]) -> None:
    """Register (or replace) a target factory under `name`."""
    _REGISTRY[name] = factory


def target_names() -> list[str]:
    return sorted(_REGISTRY)


def get_target(name: str, **options: object) -> Target:
    """A new, not yet created target `name`; `options` go to its constructor (e.g. binary paths)."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise UnknownTarget(f"target = {name!r}: unknown implementation under test; choose one of "
                            + ", ".join(repr(n) for n in target_names()))
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise TargetError(f"target = {name!r}: {entry} is not available: {exc}") from exc
    return entry(**options)
