"""The image's writes and flushes to its host file: the one write choke point, its overlap check, and header rewrites."""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.blockio import WriteSite
from models.qcow2.errors import HostIOError, ImageDead, ImageNotWritable, MetadataOverlap
from models.qcow2.header import cluster0_bytes
from models.qcow2.overlap import OL_NAMES, corruption_event, swallowed

if TYPE_CHECKING:
    from models.qcow2.image import Qcow2Image


class HostIO:
    """Every host write of one open image passes `pwrite`; `file_flush` skips a flush when nothing was written."""

    def __init__(self, img: "Qcow2Image") -> None:
        self.img = img
        self.unflushed = False

    def pwrite(self, offset: int, data: bytes, site: WriteSite) -> None:
        img = self.img
        if img.readonly:
            raise ImageNotWritable(f"{img.path}: write at offset {offset:#x} ({site}) on an image opened read-only")
        if img.dead:
            raise ImageDead(f"{img.path}: write at offset {offset:#x} ({site}): No medium found (the image was marked corrupt)")
        hit = img.overlap.check(offset, len(data), site)
        if hit is not None:
            self.signal_corruption(offset, site, hit)
        try:
            img.file.pwrite(offset, data, site)
        except HostIOError:
            if not swallowed(site):  # injected error-handling bugs only
                raise
        self.unflushed = True
        img.overlap.after_write(site)

    def signal_corruption(self, offset: int, site: WriteSite, hit: str) -> None:
        """A write would land on metadata: a fatal corruption event, and the request fails (EIO)."""
        rule = f"Preventing invalid write on metadata (overlaps with {OL_NAMES[hit]})"
        corruption_event(self.img, rule)
        raise MetadataOverlap(self.img.path, offset, f"{site} write", offset, rule)

    def file_flush(self) -> None:
        # Like the block layer's flushed_gen: no host flush when nothing was written since the last.
        img = self.img
        if self.unflushed:
            img.file.flush()
            self.unflushed = False
        if not img.l2cache.dirty:
            img.refcounts.release_recently_freed()

    def host_size(self) -> int:
        return self.img.file.size()

    def update_header(self) -> None:
        """Rewrite the whole of cluster 0 from the in-memory header (qcow2_update_header)."""
        self.pwrite(0, cluster0_bytes(self.img.hdr, self.img.extensions), WriteSite.HEADER)

    def switch_reftable(self, offset: int, clusters: int) -> None:
        """Point the header at a new refcount table (its two fields only), flush, and use it from now on."""
        img = self.img
        img.hdr.refcount_table_offset, img.hdr.refcount_table_clusters = offset, clusters
        start, raw = img.hdr.field_bytes("refcount_table_offset", "refcount_table_clusters")
        self.pwrite(start, raw, WriteSite.REFTABLE_SWITCH)
        self.file_flush()
        img.reftable_offset = offset
        img.overlap.invalidate()
