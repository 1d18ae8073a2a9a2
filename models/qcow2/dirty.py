"""The dirty-bit discipline of lazy refcounts: setting the bit, clearing it, and repairing a dirty image on open.

As QEMU's qcow2_mark_dirty / qcow2_mark_clean:

- before the first L2 update whose refcount increase is postponed, the 8-byte
  incompatible_features field is written with bit 0 set and flushed; only then is the
  image treated as dirty in memory;
- while dirty, a guest flush writes L2 tables but not refcount blocks, and L2 tables
  no longer wait for refcount blocks;
- a clean close (or switching lazy refcounts off) writes every cached table, flushes,
  and only then rewrites the header with the bit clear, and flushes again;
- a read-write open of a dirty image repairs it (check, fix all) before any write; a
  read-only open reads guest data and leaves the bit set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from models.blockio import BlockFile, WriteSite
from models.qcow2 import inject, spec
from models.qcow2.errors import RepairFailed
from models.qcow2.overlap import forget_failed_writeback
from models.qcow2.structs import FIELD_OFFSET

if TYPE_CHECKING:
    from models.qcow2.image import Qcow2Image


def mark_dirty(img: "Qcow2Image") -> None:
    """Set the bit on disk and flush it before the image counts as dirty in memory."""
    if img.dirty:
        return
    incompat = img.hdr.incompatible_features | spec.IncompatFeature.DIRTY
    img._pwrite(FIELD_OFFSET["incompatible_features"], int(incompat).to_bytes(8, "big"), WriteSite.DIRTY_BIT)
    if not inject.on("dirty-no-flush"):
        img._file_flush()
    img.hdr.incompatible_features = int(incompat)
    img.dirty = True


def mark_clean(img: "Qcow2Image") -> None:
    """Write every table, flush, then clear the bit: never clear it over refcounts still wrong on disk."""
    if not img.dirty:
        return
    if inject.on("dirty-not-cleared"):
        img._write_caches(force_refcounts=True)
        img._file_flush()
        return
    if inject.on("eio-dirty-cleared-after-failed-flush"):
        forget_failed_writeback(img)
    if inject.on("dirty-cleared-early"):
        img.hdr.incompatible_features &= ~int(spec.IncompatFeature.DIRTY)
        img.io.update_header()
        img._file_flush()
    img.dirty = False
    img._write_caches(force_refcounts=True)
    img._file_flush()
    img.hdr.incompatible_features &= ~int(spec.IncompatFeature.DIRTY)
    img.io.update_header()
    img._file_flush()


def repair_dirty(file: BlockFile, log: Callable[[str], None] | None, on_repair: Callable[[object], None] | None = None) -> None:
    """Repair a dirty image before its first write (QEMU: check with FIX_ERRORS | FIX_LEAKS on open).

    Its printed lines go to `log` one by one, or, with `on_repair`, the whole CheckResult
    goes there instead (the judge keeps the lines unformatted: see check.Lines).
    """
    from models.qcow2 import check as checkmod

    if inject.on("repair-leaks-only"):
        result = checkmod.check(file, checkmod.Fix.LEAKS)
        checkmod.clear_dirty_bit(file)
        return
    # One repairing pass, as QEMU's open path (no "Double checking the fixed image"): the
    # judge checks the recovered image itself, and the pass's own counts decide here.
    result = checkmod.repair(file, checkmod.Fix.ALL, double_check=False)
    if on_repair:
        on_repair(result)
    elif log:
        for line in result.messages:
            log(line)
    if result.check_errors or result.corruptions:
        raise RepairFailed(f"{file.name}: Could not repair dirty image: {result.check_errors} check errors, "
                           f"{result.corruptions} corruptions remain")
