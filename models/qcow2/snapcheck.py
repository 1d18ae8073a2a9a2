"""The check's own reading of the snapshot table (QEMU's qcow2_check_read_snapshot_table): what it counts, prints and cuts.

`qemu-img check` opens the image without reading the snapshot table (BDRV_O_CHECK), so
a broken table does not stop the check; each check run reads it itself, before counting
refcounts:

- a table that cannot be valid (over 65536 entries, an unaligned or overflowing offset)
  is a check error and the check stops (`Check failed: File too large` / `Invalid
  argument`); with `-r all`, entries past the 65536th are dropped first by rewriting
  `nb_snapshots` in the header;
- a table QEMU's open would refuse (an entry with over 1024 bytes of extra data, a table
  over 64 MiB) is a check error without `-r all`; with it, the extra data is cut and the
  entries that do not fit are dropped (each a corruption; the dropped ones fixed at once
  by rewriting `nb_snapshots`);
- in a v3 image, an entry with under 16 bytes of extra data is a corruption.

Deliberate difference from QEMU: its `check -r all` then rewrites the whole snapshot table
(qcow2_check_fix_snapshot_table, which allocates clusters for it). qcrash's repair does not
allocate inside the check: those corruptions stay counted (printed "ERROR", not
"Repairing"), so such a repair never reports success.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import TYPE_CHECKING

from models.blockio import WriteSite, read_exact
from models.qcow2 import spec
from models.qcow2.check.result import FIX_ERRORS, CheckCounts, Kind
from models.qcow2.errors import HostIOError, InvalidImage
from models.qcow2.snaptable import ENTRY_HEADER_SIZE, SnapshotTableError, read_entries
from models.qcow2.structs import FIELD_OFFSET

if TYPE_CHECKING:
    from models.qcow2.check.state import CheckState

__all__ = ["SnapshotTableCheck", "check_read_snapshot_table"]

_NB = FIELD_OFFSET["nb_snapshots"]
_INT64_MAX = (1 << 63) - 1


@dataclasses.dataclass
class SnapshotTableCheck:
    """The snapshot part of one check run: its counts (QEMU's snapshot_res) and errno when the check must stop."""

    counts: CheckCounts
    errno: int | None = None

    def add_to(self, res: CheckCounts) -> None:
        """qcow2_add_check_result(result, &snapshot_res, false)."""
        res.corruptions += self.counts.corruptions
        res.check_errors += self.counts.check_errors
        res.corruptions_fixed += self.counts.corruptions_fixed

    @property
    def error(self) -> str | None:
        return os.strerror(self.errno) if self.errno is not None else None


def check_read_snapshot_table(s: "CheckState", fix: int) -> SnapshotTableCheck:
    """Read the table from the header on disk; sets `s.snapshots` and `s.snapshots_size` (empty when it cannot be read)."""
    out = SnapshotTableCheck(CheckCounts())
    s.snapshots, s.snapshots_size = [], 0
    repair = bool(fix & FIX_ERRORS)
    raw = read_exact(s.file, _NB, 12)
    nb, offset = int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:], "big")
    reduced = 0
    if nb > spec.QCOW_MAX_SNAPSHOTS and repair:
        _line(s, f"Discarding {nb - spec.QCOW_MAX_SNAPSHOTS} overhanging snapshots")
        reduced, nb = nb - spec.QCOW_MAX_SNAPSHOTS, spec.QCOW_MAX_SNAPSHOTS
    bad = _validate(nb, offset, s.cs)
    if bad is not None:
        rule, err = bad
        _line(s, f"qemu-img: ERROR snapshot table {rule}")
        if nb > spec.QCOW_MAX_SNAPSHOTS:
            _line(s, f"You can force-remove all {nb - spec.QCOW_MAX_SNAPSHOTS} overhanging snapshots "
                     "with qemu-img check -r all")
        return _failed(out, err)
    try:
        got = read_entries(s.file, nb, offset, disk_size=s.hdr.size, repair=repair)
    except SnapshotTableError as exc:
        _line(s, f"qemu-img: ERROR failed to read the snapshot table: {exc.qemu_message}")
        if exc.hint:
            _line(s, exc.hint)
        return _failed(out, exc.errno)
    except (InvalidImage, HostIOError) as exc:  # a range past 2^63, or the host read failed
        err = exc.errno if isinstance(exc, HostIOError) and exc.errno else errno.EIO
        _line(s, f"qemu-img: ERROR failed to read the snapshot table: Failed to read snapshot table: {os.strerror(err)}")
        return _failed(out, err)
    for line in got.lines:
        _line(s, line)
    s.snapshots, s.snapshots_size = got.snapshots, got.size
    reduced += got.overhanging
    out.counts.corruptions += reduced + got.extra_dropped
    if reduced:
        # QEMU rewrites nb_snapshots now (qcow2_check_refcounts trusts it); the dropped entries leak.
        s.file.pwrite(_NB, len(got.snapshots).to_bytes(4, "big"), WriteSite.REPAIR)
        s.file.flush()
        s.hdr.nb_snapshots = len(got.snapshots)
        out.counts.corruptions_fixed += reduced
        out.counts.corruptions -= reduced
    if s.hdr.version >= 3:
        for i in got.incomplete:
            out.counts.corruptions += 1
            _line(s, f"ERROR snapshot table entry {i} is incomplete")
    if out.counts.corruptions and repair:
        _line(s, f"qcrash: ERROR the snapshot table needs rewriting ({out.counts.corruptions} corruptions), "
                 "which qcrash's repair does not implement")
    return out


def _validate(nb: int, offset: int, cluster_size: int) -> tuple[str, int] | None:
    """qcow2_validate_table for the snapshot table: (rule, errno) when it fails."""
    if nb > spec.QCOW_MAX_SNAPSHOTS:
        return "too large", errno.EFBIG
    if _INT64_MAX - nb * ENTRY_HEADER_SIZE < offset or offset % cluster_size:
        return "offset invalid", errno.EINVAL
    return None


def _failed(out: SnapshotTableCheck, err: int) -> SnapshotTableCheck:
    out.counts.check_errors += 1
    out.errno = err
    return out


def _line(s: "CheckState", text: str) -> None:
    s.emit(Kind.SNAPSHOT_TABLE, "{}", text)
