"""Internal snapshots in the reference model: named, immutable copies of the guest view, and what a crash may leave of a snapshot operation.

The rules (the crash contract, section "Snapshots"):

- **create** is a flush that also captures the guest view. The harness issues one call at
  a time, so the view at begin is the view at completion; QEMU flushes before it publishes
  the snapshot table, so the captured values are all durable once the snapshot exists.
- **apply** replaces the guest view with the snapshot's, and is durable when it returns
  (QEMU syncs the active L1 and flushes). While it is in flight each sector may read its
  old allowed values or the snapshot's value; `half_applied` adds the all-or-nothing rule
  per L1 sector's worth of guest space (QEMU overwrites the L1 in place: one sector of it is
  atomic, several are not).
- **delete** is a flush that forgets a snapshot; it changes no guest data.
- after a crash, the snapshot operation in flight is done or not done: the set of
  snapshots is the one before it or the one after it, and every snapshot present reads
  exactly as it did when it was taken.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.blockio import SECTOR
from models.refjudge import ReadFn
from models.refops import GuestOpKind
from models.refvalues import ZERO_SECTOR, Maker, Val, crc32c, zeros_of

if TYPE_CHECKING:
    from models.refdisk import ReferenceDisk

SnapOp = tuple[int, str, str, dict[int, Val] | None]
"""The snapshot operation in flight: (op index, "create" | "delete" | "apply", name, the view it captures or applies)."""


class SnapshotError(ValueError):
    """A snapshot request the model refuses (unknown name, one in flight already); the message says which rule."""


class Snapshots:
    """The snapshots of one ReferenceDisk: `snaps` (name -> sector values) and `op` (the one in flight)."""

    def __init__(self, disk: "ReferenceDisk") -> None:
        self.disk = disk
        self.snaps: dict[str, dict[int, Val]] = {}
        self.op: SnapOp | None = None

    def copy(self, disk: "ReferenceDisk") -> Snapshots:
        """The same snapshots for a copy of the disk (views are never changed in place)."""
        new = Snapshots(disk)
        new.snaps = dict(self.snaps)
        new.op = self.op
        return new

    # ---- begin / complete -------------------------------------------------------------------
    def begin_create(self, op_index: int, name: str) -> None:
        """Snapshot `name` is being taken: a flush in flight that captures the current view."""
        self._no_snapshot_in_flight("create", name)
        if name in self.snaps:
            raise SnapshotError(f"snapshot create #{op_index}: a snapshot named {name!r} exists already")
        self.disk.begin_flush(op_index)
        history = self.disk.history
        view = {s: v for s in history.dur if (v := history.current(s)).src is not None}
        self.op = (op_index, "create", name, view)

    def begin_delete(self, op_index: int, name: str) -> None:
        """Snapshot `name` is being deleted: a flush in flight; no guest data changes."""
        self._no_snapshot_in_flight("delete", name)
        self._known(op_index, "delete", name)
        self.disk.begin_flush(op_index)
        self.op = (op_index, "delete", name, None)

    def begin_apply(self, op_index: int, name: str) -> None:
        """The disk reverts to snapshot `name`: every sector whose value changes gets the snapshot's, in flight."""
        self._no_snapshot_in_flight("apply", name)
        view = self._known(op_index, "apply", name)
        self.disk._begin(GuestOpKind.WRITE, op_index, 0, self.disk.size)
        history = self.disk.history
        maker = Maker(op_index, f"snapshot apply #{op_index} ({name})")
        for sector in sorted(set(history.dur) | set(view)):
            want = view.get(sector)
            current = history.current(sector)
            if (want.fp if want else None) == (current.fp if current.src is not None else None):
                continue
            history.push(sector, Val(want.fp, maker, want.src) if want else zeros_of(maker))
        self.op = (op_index, "apply", name, view)

    def finish(self, op_index: int) -> None:
        """Called by complete(): the operation returned, so its outcome is fixed and durable."""
        op = self.op
        if op is None or op[0] != op_index:
            return
        _index, kind, name, view = op
        self.op = None
        if kind == "create":
            assert view is not None
            self.snaps[name] = view
        elif kind == "delete":
            del self.snaps[name]
        else:
            # QEMU's goto flushes before and syncs the L1: everything completed is durable now.
            live = self.disk.log.live
            done = {i for i, o in live.items() if o.completed}
            self.disk.history.make_durable(done, None, None, live)

    # ---- queries for judging ------------------------------------------------------------------
    def in_flight(self) -> bool:
        return self.op is not None

    def names(self) -> list[str]:
        return sorted(self.snaps)

    def outcomes(self) -> list[frozenset[str]]:
        """The sets of snapshot names a crash may leave: before the op in flight, and after it."""
        before = frozenset(self.snaps)
        op = self.op
        if op is None or op[1] == "apply":
            return [before]
        after = before | {op[2]} if op[1] == "create" else before - {op[2]}
        return [before, after]

    def view(self, name: str) -> dict[int, Val]:
        """Sector -> value of a snapshot, committed or being taken (sectors absent read zero)."""
        op = self.op
        if name in self.snaps:
            return self.snaps[name]
        if op is not None and op[1] == "create" and op[2] == name and op[3] is not None:
            return op[3]
        raise SnapshotError(f"snapshot {name!r}: the model has no such snapshot")

    def mismatch(self, name: str, read_fn: ReadFn, sectors: list[int]) -> str | None:
        """Compare a snapshot read through the image with the model: the first differing sector, described."""
        view = self.view(name)
        wanted = sorted(set(sectors) | set(view))
        for sector in wanted:
            got = read_fn(sector * SECTOR, SECTOR)
            want = view.get(sector)
            if got != (want.data(sector) if want else bytes(SECTOR)):
                made = want.maker.label if want else "zeros"
                return f"snapshot {name!r}: sector {sector} reads differently from when it was taken (held {made})"
        return None

    def mismatch_view(self, name: str, got: dict[int, bytes], sectors: list[int]) -> str | None:
        """`mismatch` on sectors already read (`got` holds every sector it reads), values recognised by
        their CRC-32C fingerprint as the crash judge recognises them; None when `got` lacks a sector
        (the caller then reads one by one through `mismatch`)."""
        view = self.view(name)
        wanted = sorted(set(sectors) | set(view))
        if not got.keys() >= set(wanted):
            return None
        for sector in wanted:
            data = got[sector]
            want = view.get(sector)
            if (crc32c(data) != want.fp) if want is not None else (data != ZERO_SECTOR):
                made = want.maker.label if want else "zeros"
                return f"snapshot {name!r}: sector {sector} reads differently from when it was taken (held {made})"
        return ""

    def half_applied(self, read_fn: ReadFn, span: int) -> str | None:
        """With an apply in flight: a guest span (bytes) showing both sectors only the old view allows and
        sectors only the snapshot allows is half applied."""
        op = self.op
        if op is None or op[1] != "apply":
            return None
        index = op[0]
        history = self.disk.history
        per_span: dict[int, tuple[int | None, int | None]] = {}
        for sector, values in history.pending.items():
            new = [v for v in values if v.maker.op_index == index]
            if not new:
                continue
            old = {history.dur[sector].fp} | {v.fp for v in values if v.maker.op_index != index}
            fp = crc32c(read_fn(sector * SECTOR, SECTOR))
            key = sector * SECTOR // span
            seen_old, seen_new = per_span.get(key, (None, None))
            if fp in old and fp != new[-1].fp:
                seen_old = sector if seen_old is None else seen_old
            elif fp == new[-1].fp and fp not in old:
                seen_new = sector if seen_new is None else seen_new
            per_span[key] = (seen_old, seen_new)
            if seen_old is not None and seen_new is not None:
                return (f"snapshot apply #{index} ({op[2]}) half done: sector {seen_new} reads the snapshot's value "
                        f"but sector {seen_old} still reads the old view (same {span}-byte span of one L1 sector)")
        return None

    def settle(self, names: frozenset[str]) -> None:
        """After a crash: adopt the outcome the recovered image shows (one of outcomes())."""
        op = self.op
        if op is not None and op[1] == "create" and op[2] in names and op[3] is not None:
            self.snaps[op[2]] = op[3]
        if op is not None and op[1] == "delete" and op[2] not in names:
            self.snaps.pop(op[2], None)
        self.op = None

    # ---- helpers ----------------------------------------------------------------------------------
    def _no_snapshot_in_flight(self, what: str, name: str) -> None:
        if self.op is not None:
            raise SnapshotError(f"snapshot {what} {name!r}: snapshot op #{self.op[0]} is still in flight")

    def _known(self, op_index: int, what: str, name: str) -> dict[int, Val]:
        if name not in self.snaps:
            raise SnapshotError(f"snapshot {what} #{op_index}: no snapshot named {name!r}")
        return self.snaps[name]
