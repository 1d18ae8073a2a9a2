"""Structure-aware guest ranges: offsets and lengths drawn from uniform values and from the image's geometry under a configuration.

Bugs in qcow2 drivers cluster at structure edges, which uniform ranges seldom hit:
- the last entry of an L2 table and the first of the next (a range crossing an L1 entry's span);
- ranges spanning several L2 tables;
- the first host cluster that needs a new refcount block, and refcount-table growth (a
  sequential write long enough to reach them, computed from an estimate of the host file);
- the end of the virtual disk;
- cluster and sector heads and tails, and ranges one sector off a cluster boundary.

`Written` remembers what the sequence wrote, so discards, zero writes and reads can aim at
ranges written before and at ranges never written. Every choice goes through a
`harness.generate.Source`, so `qcrash fuzz` (a seeded rng) and the Hypothesis machine
(replayed draws) share this code.
"""

from __future__ import annotations

import dataclasses
import math

from harness.config import Config
from models.blockio import SECTOR

FILL_LIMIT = 4 << 20  # the longest generated request: keeps an example's host file (and its crash states) small
SPAN_LIMIT = 512 << 10  # the widest L2 table a range spans whole (2 KiB clusters); wider ones only have edges crossed


@dataclasses.dataclass(frozen=True)
class Shape:
    """The geometry one configuration gives an image, in bytes (guest) and clusters (host)."""

    cluster_size: int
    size: int  # virtual disk size
    l2_span: int  # guest bytes one L2 table maps (one L1 entry)
    refblock_span: int  # host clusters one refcount block counts
    reftable_span: int  # host clusters a one-cluster refcount table covers
    base_clusters: int  # host clusters of a fresh image: header, refcount table and block, L1

    @classmethod
    def of(cls, config: Config) -> "Shape":
        cs = config.cluster_size
        rbe = cs * 8 // config.refcount_bits
        l2_span = cs * (cs // 8)
        l1_bytes = -(-config.virtual_size // l2_span) * 8
        return cls(cs, config.virtual_size, l2_span, rbe, (cs // 8) * rbe, 3 + -(-l1_bytes // cs))

    def clamp(self, offset: int, length: int) -> tuple[int, int]:
        """A valid sector-aligned range inside the disk, as near to (offset, length) as possible."""
        offset = min(max(0, offset // SECTOR * SECTOR), self.size - SECTOR)
        length = min(max(SECTOR, length // SECTOR * SECTOR), self.size - offset, FILL_LIMIT)
        return offset, length


@dataclasses.dataclass
class Written:
    """What a sequence wrote so far: the ranges, in order, and the guest clusters and L2 tables they touched."""

    ranges: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    clusters: set[int] = dataclasses.field(default_factory=set)
    l2_tables: set[int] = dataclasses.field(default_factory=set)

    def add(self, shape: Shape, offset: int, length: int) -> None:
        self.ranges.append((offset, length))
        first, last = offset // shape.cluster_size, (offset + length - 1) // shape.cluster_size
        self.clusters.update(range(first, last + 1))
        self.l2_tables.update(range(offset // shape.l2_span, (offset + length - 1) // shape.l2_span + 1))

    def host_clusters(self, shape: Shape) -> int:
        """An estimate of the host file in clusters: data, L2 tables and the refcount blocks counting them
        (frees and reuse ignored: an upper bound, roughly)."""
        counted = shape.base_clusters + len(self.l2_tables) + len(self.clusters)
        return counted + (counted - 1) // (shape.refblock_span - 1)  # a fresh image's one block is in base

    def end(self) -> int:
        """The guest offset just past everything written (0 when nothing was)."""
        return max((o + n for o, n in self.ranges), default=0)


# --------------------------------------------------------------------------- range kinds
# Each kind returns an (offset, length) that Shape.clamp makes valid. Weights are relative.


def _uniform(src, shape: Shape, written: Written) -> tuple[int, int]:
    sectors = shape.size // SECTOR
    offset = src.randrange(sectors) * SECTOR
    return offset, SECTOR * src.randint(1, max(1, 4 * shape.cluster_size // SECTOR))


def _cluster(src, shape: Shape, written: Written) -> tuple[int, int]:
    """Cluster heads and tails: a whole cluster, its first or last sectors, or one sector off its boundary."""
    cs, per = shape.cluster_size, shape.cluster_size // SECTOR
    base = src.randrange(0, shape.size, cs)
    k = src.randint(1, max(1, per - 1)) * SECTOR  # a partial cluster (a sector when clusters are 512 B)
    return src.choice((
        (base, cs),  # whole cluster
        (base, cs * src.randint(2, 3)),  # whole clusters
        (base, k),  # head
        (base + cs - k, k),  # tail
        (base + cs - k, k + cs),  # tail and the whole next cluster
        (base + SECTOR, cs),  # one sector after the boundary, ending one sector into the next cluster
        (base - SECTOR, cs + 2 * SECTOR),  # one sector either side of a cluster
    ))


def _l2_edge(src, shape: Shape, written: Written) -> tuple[int, int]:
    """Across an L2-table boundary: the last entries of one table and the first of the next."""
    tables = shape.size // shape.l2_span
    if tables < 1 or shape.l2_span >= shape.size:
        return _cluster(src, shape, written)
    edge = src.randint(1, tables) * shape.l2_span
    before = src.choice((SECTOR, shape.cluster_size, 2 * shape.cluster_size, shape.cluster_size - SECTOR))
    after = src.choice((SECTOR, shape.cluster_size, 2 * shape.cluster_size, 0))
    return edge - before, before + after


def _l2_span(src, shape: Shape, written: Written) -> tuple[int, int]:
    """A range over several L2 tables: from a table's first entry, or a cluster before it, into the table after next."""
    if shape.l2_span > SPAN_LIMIT:  # large clusters: a table maps MiBs; crossing one edge is _l2_edge's job
        return _l2_edge(src, shape, written)
    tables = max(1, shape.size // shape.l2_span)
    start = src.randrange(tables) * shape.l2_span - src.choice((0, shape.cluster_size))
    return start, src.randint(2, 3) * shape.l2_span


def _disk_end(src, shape: Shape, written: Written) -> tuple[int, int]:
    """Ending at the end of the disk: its last sectors, its last cluster's tail, or its last clusters."""
    cs = shape.cluster_size
    n = src.choice((SECTOR, cs - SECTOR, cs, 2 * cs, cs + SECTOR))
    return shape.size - n, n


def _hot(src, shape: Shape, written: Written) -> tuple[int, int]:
    """The first clusters of the disk, so overwrites, frees and reuse happen."""
    cs = shape.cluster_size
    base = src.randrange(0, min(shape.size, 16 * cs), cs)
    return base, src.choice((cs, SECTOR * src.randint(1, 8), cs * src.randint(1, 3)))


def fill_clusters(shape: Shape, used: int, edge: int) -> int:
    """Data clusters a sequential write into never-written space needs so the host file (`used` clusters
    now) grows past host cluster `edge`.

    Each data cluster also costs a share of an L2 table and of the refcount block counting both,
    so fewer data clusters than `edge - used` get there; two more make sure the edge is crossed
    (an estimate low by one would stop just short of it: see tests/unit/test_generate.py).
    """
    per = (1 + 1 / (shape.cluster_size // 8)) * shape.refblock_span / (shape.refblock_span - 1)
    return math.ceil(max(0, edge - used) / per) + 2


def edges(shape: Shape, used: int) -> tuple[int, int]:
    """The next host clusters that need a new refcount block and that grow the refcount table, past `used`."""
    return (-(-(used + 1) // shape.refblock_span) * shape.refblock_span,
            -(-(used + 1) // shape.reftable_span) * shape.reftable_span)


def growth_in_reach(shape: Shape) -> bool:
    """Whether one fill from a fresh image can grow the refcount table: the disk and the request limit
    both hold the data clusters it takes (a one-cluster table covers cluster_size**3 / refcount_bits
    bytes of host file, 2 MiB at 512 B clusters with 64-bit refcounts, 128 MiB at 2 KiB)."""
    need = fill_clusters(shape, shape.base_clusters, shape.reftable_span)
    return need * shape.cluster_size <= min(shape.size, FILL_LIMIT)


def fill(src, shape: Shape, written: Written, *, growth: bool = False) -> tuple[int, int]:
    """A sequential write into never-written space, long enough that allocation needs a new refcount block
    or grows the refcount table (from the estimated host size), when the disk allows; `growth` aims at
    the table growth only."""
    cs = shape.cluster_size
    used = written.host_clusters(shape)
    next_block, next_table = edges(shape, used)
    limit = min(shape.size, FILL_LIMIT) // cs
    aims = (next_table,) if growth else (next_block, next_table, next_table)
    needs = [n for n in (fill_clusters(shape, used, t) for t in aims) if n <= limit]
    if not needs:  # the disk (or the request limit) is too small to reach the edge
        return shape.clamp(*_hot(src, shape, written))
    clusters = src.choice(needs)
    start = -(-written.end() // cs) * cs
    if start + clusters * cs > shape.size:
        start = 0
    return shape.clamp(start, clusters * cs)


# The first row is what a zero draw picks (Hypothesis shrinks toward it): the simplest ranges.
RANGE_MIX: tuple[tuple[object, int], ...] = (
    (_hot, 25),
    (_cluster, 25),
    (_uniform, 15),
    (_l2_edge, 15),
    (_l2_span, 5),
    (_disk_end, 10),
    (fill, 5),
)


def structured_range(src, shape: Shape, written: Written) -> tuple[int, int]:
    """A range of one kind from RANGE_MIX, made valid."""
    kind = src.choices([k for k, _ in RANGE_MIX], [w for _, w in RANGE_MIX])[0]
    return shape.clamp(*kind(src, shape, written))


def near_written(src, shape: Shape, written: Written) -> tuple[int, int]:
    """A range over data written earlier: exactly, widened to whole clusters, or a head or tail of it."""
    cs = shape.cluster_size
    off, n = src.choice(written.ranges)
    start = off - off % cs
    end = -(-(off + n) // cs) * cs
    half = max(SECTOR, n // 2 // SECTOR * SECTOR)
    return shape.clamp(*src.choice(((start, end - start), (start, end - start), (off, n), (off, half),
                                    (off + n - half, half))))


def never_written(src, shape: Shape, written: Written) -> tuple[int, int]:
    """A range in guest clusters no write of the sequence touched (a structured one when there is none nearby)."""
    cs = shape.cluster_size
    clusters = shape.size // cs
    for _ in range(4):
        c = src.randrange(max(1, clusters))
        if c not in written.clusters:
            n = 1
            while n < 3 and c + n < clusters and c + n not in written.clusters:
                n += 1
            return shape.clamp(c * cs, src.randint(1, n) * cs)
    return structured_range(src, shape, written)
