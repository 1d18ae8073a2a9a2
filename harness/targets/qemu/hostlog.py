"""Convert a blklogwrites log into qcrash's host-operation log (`harness.faultfile.WriteLog`), naming each write's site.

The conversion replays the log over the image's bytes from when logging started, so it
knows the file at every point: that is what the crash-image builder needs (the base plus
the ops), and what site classification reads (`layout.read_layout`).

- write entry   -> WRITE with its data (a `write -z` that reaches the file is a write of zeros)
- FLUSH entry   -> FLUSH (QEMU appends it after the file-level flush completed)
- DISCARD entry -> WRITE of zeros over the part inside the file: file-posix punches a hole
                   (KEEP_SIZE), which reads as zeros once it lands and may be lost before a
                   flush, like any unsynced write
- a size change the log cannot show (a truncate below the filter) -> TRUNCATE, found by
  `reconcile` comparing the replayed size with the real file after each command

Sites: a write to cluster 0 is DIRTY_BIT when it changes only bytes 72..79, REFTABLE_SWITCH
when it changes only bytes 48..59, else HEADER. Other writes take the role their cluster
has in the layout at that point (L1, L2, REFTABLE, REFBLOCK, DATA). A write to a cluster
nothing references yet is a structure being born: its site is settled when a later write
links it in (L2_ALLOC, REFBLOCK_ALLOC, REFTABLE_GROW, DATA), and `settle()` at the end of a
guest operation calls what is still unlinked DATA (a writeback data write whose L2 update
is still cached: only data can stay unreferenced across a whole guest operation).
"""

from __future__ import annotations

import dataclasses

from harness.faultfile import HostOpKind, WriteLog
from harness.targets.qemu.blklog import Entry
from harness.targets.qemu.layout import Layout, Role, read_layout
from models.blockio import WriteSite

__all__ = ["Converter"]

_NOW = {Role.HEADER: WriteSite.HEADER, Role.L1: WriteSite.L1, Role.L2: WriteSite.L2, Role.REFTABLE: WriteSite.REFTABLE,
        Role.REFBLOCK: WriteSite.REFBLOCK, Role.DATA: WriteSite.DATA}
# A structure first seen when a later write links it in was being allocated when written.
_BORN = {Role.L2: WriteSite.L2_ALLOC, Role.REFBLOCK: WriteSite.REFBLOCK_ALLOC, Role.REFTABLE: WriteSite.REFTABLE_GROW,
         Role.L1: WriteSite.L1, Role.DATA: WriteSite.DATA, Role.HEADER: WriteSite.HEADER}
_DIRTY_FIELD = range(72, 80)
_REFTABLE_FIELDS = range(48, 60)
_RMW_LIMIT = 512  # blklogwrites' request alignment: sub-sector field writes arrive as one sector
_HEADER_LIMIT = 1 << 21  # cluster 0 lies below the largest cluster size


class Converter:
    """Incremental blklogwrites -> WriteLog conversion over one image file's history."""

    def __init__(self, base: bytes) -> None:
        self.log = WriteLog(base)
        self.image = bytearray(base)
        self.layout: Layout | None = read_layout(self.image)
        self._unlinked: dict[int, tuple[int, int]] = {}  # log index -> (offset, length) of writes not yet linked in

    @property
    def size(self) -> int:
        return len(self.image)

    def feed(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Append the host operations of newly parsed log entries."""
        for entry in entries:
            if entry.is_flush:
                self.log.append(HostOpKind.FLUSH, 0, b"", WriteSite.OTHER, len(self.image))
            elif entry.is_discard:
                end = min(entry.offset + entry.length, len(self.image))
                if end > entry.offset:
                    self._write(entry.offset, bytes(end - entry.offset), discard=True)
            else:
                self._write(entry.offset, entry.data)

    def reconcile(self, real_size: int) -> None:
        """Record a size change that bypassed the log (the real file is the truth), as a TRUNCATE."""
        if real_size != len(self.image):
            self._resize(real_size)
            self.log.append(HostOpKind.TRUNCATE, real_size, b"", WriteSite.OTHER, real_size)

    def settle(self) -> None:
        """End of a guest operation: writes still linked in by nothing are data (see the module docstring)."""
        for index in list(self._unlinked):
            self._set_site(index, WriteSite.DATA)
        self._unlinked.clear()

    # ---- internals -------------------------------------------------------------------------------
    def _write(self, offset: int, data: bytes, *, discard: bool = False) -> None:
        before = bytes(self.image[offset:offset + len(data)]) if offset < _HEADER_LIMIT else b""
        if offset + len(data) > len(self.image):
            self._resize(offset + len(data))
        self.image[offset:offset + len(data)] = data
        site, relayout = self._classify(offset, data, before)
        op = self.log.append(HostOpKind.WRITE, offset, data, WriteSite.OTHER if discard else site, len(self.image))
        if site is None and not discard:
            self._unlinked[op.index] = (offset, len(data))
            self.log.ops[op.index] = dataclasses.replace(op, site=WriteSite.OTHER)
        if relayout:
            self.layout = read_layout(self.image)
            self._link_born()

    def _classify(self, offset: int, data: bytes, before: bytes) -> tuple[WriteSite | None, bool]:
        layout = self.layout
        if layout is None:  # no valid header yet (never for an image QEMU opened), so nothing to name
            return WriteSite.OTHER, True
        if offset < layout.cluster_size:
            return _header_site(offset, data, before), True
        role = layout.role_of(offset, len(data))
        relayout = layout.touches_defining(offset, len(data))
        return (_NOW[role] if role is not None else None), relayout

    def _link_born(self) -> None:
        if not self._unlinked or self.layout is None:
            return
        for index, (offset, length) in list(self._unlinked.items()):
            role = self.layout.role_of(offset, length)
            if role is not None:
                self._set_site(index, _BORN[role])
                del self._unlinked[index]

    def _set_site(self, index: int, site: WriteSite) -> None:
        self.log.ops[index] = dataclasses.replace(self.log.ops[index], site=site)

    def _resize(self, size: int) -> None:
        if size < len(self.image):
            del self.image[size:]
        else:
            self.image.extend(bytes(size - len(self.image)))


def _header_site(offset: int, data: bytes, before: bytes) -> WriteSite:
    """Tell the dirty-bit write and the reftable switch (512-byte read-modify-writes below the filter) from a header rewrite."""
    if len(before) < len(data) or data == before:
        return WriteSite.HEADER  # growth, or a rewrite that changed nothing: a whole-header write
    if len(data) > _RMW_LIMIT:
        return WriteSite.HEADER  # qcow2_update_header rewrites the whole cluster (e.g. mark_clean)
    for field, site in ((_DIRTY_FIELD, WriteSite.DIRTY_BIT), (_REFTABLE_FIELDS, WriteSite.REFTABLE_SWITCH)):
        lo, hi = field.start - offset, field.stop - offset
        if lo >= 0 and hi <= len(data) and data[:lo] == before[:lo] and data[hi:] == before[hi:]:
            # With 512-byte clusters a header rewrite is one sector too: only *setting* the
            # dirty bit is mark_dirty's 8-byte write; clearing it is a header rewrite.
            if site is WriteSite.DIRTY_BIT and not data[79 - offset] & 1:
                return WriteSite.HEADER
            return site
    return WriteSite.HEADER
