"""The metadata table cache (L2 tables, refcount blocks) and its flush dependencies, as QEMU's qcow2-cache.c.

Ordering is stated as data, not scattered through the code:

- `cache.depends = other`: before any entry of `cache` is written, every dirty entry
  of `other` is written and the file flushed. With accurate refcounts the L2 cache
  depends on the refcount cache (a new cluster is counted on disk before an L2 entry
  points at it); a refcount decrease makes the refcount cache depend on the L2 cache
  (the L2 entry stops pointing at a cluster before its count drops).
- `cache.depends_on_flush`: before any entry is written the file is flushed (used
  when guest data written into a reused cluster must be durable before the L2 entry
  that makes it visible).

The cache holds every table it has loaded (images under test are small); write-back
happens only through `write()`/`flush()`, so the order of host writes is deterministic.
"""

from __future__ import annotations

from typing import Callable

from models.blockio import WriteSite

ReadFn = Callable[[int, int], bytes]
WriteFn = Callable[[int, bytes, WriteSite], None]


class TableCache:
    def __init__(
        self, name: str, read: ReadFn, write: WriteFn, table_size: int, site: WriteSite, file_flush: Callable[[], None]
    ) -> None:
        self.name = name
        self.read = read
        self.write_fn = write
        self.table_size = table_size
        self.site = site
        self.file_flush = file_flush
        self.tables: dict[int, bytearray] = {}
        self.dirty: set[int] = set()
        self.depends: TableCache | None = None
        self.depends_on_flush = False

    def get(self, offset: int) -> bytearray:
        table = self.tables.get(offset)
        if table is None:
            table = bytearray(self.read(offset, self.table_size))
            self.tables[offset] = table
        return table

    def get_empty(self, offset: int) -> bytearray:
        """A table for a freshly allocated cluster: zeros, never read from disk."""
        table = bytearray(self.table_size)
        self.tables[offset] = table
        return table

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def set_dependency(self, dependency: "TableCache") -> None:
        # Mirrors qcow2_cache_set_dependency: cycles are broken by flushing first.
        if dependency.depends is not None:
            dependency.flush_dependency()
        if self.depends is not None and self.depends is not dependency:
            self.flush_dependency()
        self.depends = dependency

    def flush_dependency(self) -> None:
        dep = self.depends
        if dep is not None:
            dep.flush()
        self.depends = None
        self.depends_on_flush = False

    def _before_entry_write(self) -> None:
        if self.depends is not None:
            self.flush_dependency()
        elif self.depends_on_flush:
            self.file_flush()
            self.depends_on_flush = False

    def write(self) -> None:
        """Write every dirty table (in offset order, for determinism), honouring dependencies."""
        for offset in sorted(self.dirty):
            self._before_entry_write()
            self.write_fn(offset, bytes(self.tables[offset]), self.site)
            self.dirty.discard(offset)

    def flush(self) -> None:
        self.write()
        self.file_flush()

    def drop(self, offset: int) -> None:
        self.tables.pop(offset, None)
        self.dirty.discard(offset)

    def clear(self) -> None:
        self.tables.clear()
        self.dirty.clear()
        self.depends = None
        self.depends_on_flush = False
