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

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from models.refdisk import _Val

SECTOR_SIZE = 512
ReadFn = Callable[[int, int], bytes]


class SnapshotError(ValueError):
    """A snapshot request the model refuses (unknown name, one in flight already); the message says which rule."""


class SnapshotsMixin:
    """Snapshot bookkeeping for ReferenceDisk: `_snaps` (name -> sector values) and `_snap_op` (the one in flight)."""

    _snaps: dict[str, dict[int, "_Val"]]
    _snap_op: tuple[int, str, str, dict[int, "_Val"] | None] | None

    # ---- begin / complete -------------------------------------------------------------------
    def begin_snapshot_create(self, op_index: int, name: str) -> None:
        """Snapshot `name` is being taken: a flush in flight that captures the current view."""
        self._no_snapshot_in_flight("create", name)
        if name in self._snaps:
            raise SnapshotError(f"snapshot create #{op_index}: a snapshot named {name!r} exists already")
        self.begin_flush(op_index)  # type: ignore[attr-defined]
        view = {s: v for s in self._dur if (v := self._current(s)).src is not None}  # type: ignore[attr-defined]
        self._snap_op = (op_index, "create", name, view)

    def begin_snapshot_delete(self, op_index: int, name: str) -> None:
        """Snapshot `name` is being deleted: a flush in flight; no guest data changes."""
        self._no_snapshot_in_flight("delete", name)
        self._known(op_index, "delete", name)
        self.begin_flush(op_index)  # type: ignore[attr-defined]
        self._snap_op = (op_index, "delete", name, None)

    def begin_snapshot_apply(self, op_index: int, name: str) -> None:
        """The disk reverts to snapshot `name`: every sector whose value changes gets the snapshot's, in flight."""
        from models.refdisk import GuestOpKind, _Maker, _Val

        self._no_snapshot_in_flight("apply", name)
        view = self._known(op_index, "apply", name)
        self._begin(GuestOpKind.WRITE, op_index, 0, self.size)  # type: ignore[attr-defined]
        maker = _Maker(op_index, f"snapshot apply #{op_index} ({name})")
        for sector in sorted(set(self._dur) | set(view)):  # type: ignore[attr-defined]
            want = view.get(sector)
            current = self._current(sector)  # type: ignore[attr-defined]
            if (want.fp if want else None) == (current.fp if current.src is not None else None):
                continue
            self._push(sector, _Val(want.fp, maker, want.src) if want else self._zeros(maker))  # type: ignore[attr-defined]
        self._snap_op = (op_index, "apply", name, view)

    def _finish_snapshot(self, op_index: int) -> None:
        """Called by complete(): the operation returned, so its outcome is fixed and durable."""
        op = self._snap_op
        if op is None or op[0] != op_index:
            return
        _index, kind, name, view = op
        self._snap_op = None
        if kind == "create":
            assert view is not None
            self._snaps[name] = view
        elif kind == "delete":
            del self._snaps[name]
        else:
            # QEMU's goto flushes before and syncs the L1: everything completed is durable now.
            done = {i for i, o in self._ops.items() if o.completed}  # type: ignore[attr-defined]
            self._make_durable(done, None, None)  # type: ignore[attr-defined]

    # ---- queries for judging ------------------------------------------------------------------
    def snapshot_in_flight(self) -> bool:
        return self._snap_op is not None

    def snapshot_names(self) -> list[str]:
        return sorted(self._snaps)

    def snapshot_outcomes(self) -> list[frozenset[str]]:
        """The sets of snapshot names a crash may leave: before the op in flight, and after it."""
        before = frozenset(self._snaps)
        op = self._snap_op
        if op is None or op[1] == "apply":
            return [before]
        after = before | {op[2]} if op[1] == "create" else before - {op[2]}
        return [before, after]

    def snapshot_view(self, name: str) -> dict[int, "_Val"]:
        """Sector -> value of a snapshot, committed or being taken (sectors absent read zero)."""
        op = self._snap_op
        if name in self._snaps:
            return self._snaps[name]
        if op is not None and op[1] == "create" and op[2] == name and op[3] is not None:
            return op[3]
        raise SnapshotError(f"snapshot {name!r}: the model has no such snapshot")

    def snapshot_mismatch(self, name: str, read_fn: ReadFn, sectors: list[int]) -> str | None:
        """Compare a snapshot read through the image with the model: the first differing sector, described."""
        view = self.snapshot_view(name)
        wanted = sorted(set(sectors) | set(view))
        for sector in wanted:
            got = read_fn(sector * SECTOR_SIZE, SECTOR_SIZE)
            want = view.get(sector)
            if got != (want.data(sector) if want else bytes(SECTOR_SIZE)):
                made = want.maker.label if want else "zeros"
                return f"snapshot {name!r}: sector {sector} reads differently from when it was taken (held {made})"
        return None

    def half_applied(self, read_fn: ReadFn, span: int) -> str | None:
        """With an apply in flight: a guest span (bytes) showing both sectors only the old view allows and
        sectors only the snapshot allows is half applied."""
        op = self._snap_op
        if op is None or op[1] != "apply":
            return None
        index = op[0]
        per_span: dict[int, tuple[int | None, int | None]] = {}
        for sector, values in self._pending.items():  # type: ignore[attr-defined]
            new = [v for v in values if v.maker.op_index == index]
            if not new:
                continue
            old = {self._dur[sector].fp} | {v.fp for v in values if v.maker.op_index != index}  # type: ignore[attr-defined]
            fp = _fp(read_fn(sector * SECTOR_SIZE, SECTOR_SIZE))
            key = sector * SECTOR_SIZE // span
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

    def settle_snapshots(self, names: frozenset[str]) -> None:
        """After a crash: adopt the outcome the recovered image shows (one of snapshot_outcomes())."""
        op = self._snap_op
        if op is not None and op[1] == "create" and op[2] in names and op[3] is not None:
            self._snaps[op[2]] = op[3]
        if op is not None and op[1] == "delete" and op[2] not in names:
            self._snaps.pop(op[2], None)
        self._snap_op = None

    # ---- helpers ----------------------------------------------------------------------------------
    def _no_snapshot_in_flight(self, what: str, name: str) -> None:
        if self._snap_op is not None:
            raise SnapshotError(f"snapshot {what} {name!r}: snapshot op #{self._snap_op[0]} is still in flight")

    def _known(self, op_index: int, what: str, name: str) -> dict[int, "_Val"]:
        if name not in self._snaps:
            raise SnapshotError(f"snapshot {what} #{op_index}: no snapshot named {name!r}")
        return self._snaps[name]

    @staticmethod
    def _zeros(maker) -> "_Val":
        from models.refdisk import ZERO_FINGERPRINT, _Val

        return _Val(ZERO_FINGERPRINT, maker, None)


def _fp(data: bytes) -> int:
    from models.refdisk import crc32c

    return crc32c(data)
