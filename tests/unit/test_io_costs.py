"""Host writes and flushes per guest write, counted at the block-file seam, against QEMU 7.2's measured costs (facts §2.2)."""

from __future__ import annotations

import pytest

from models.blockio import CountingFile, MemoryFile, WriteSite
from models.qcow2.image import Qcow2Image

CS = 64 * 1024
STEADY_WRITES = 8


def open_counted(*, lazy: bool, mode: str, size: int = 1 << 30) -> tuple[Qcow2Image, CountingFile]:
    mem = MemoryFile(name="costs.qcow2")
    Qcow2Image.create(mem, size, lazy_refcounts=lazy)
    counted = CountingFile(mem)
    img = Qcow2Image.open(counted, cache_mode=mode)
    counted.reset()
    return img, counted


def steady_state(img: Qcow2Image, counted: CountingFile, n: int = STEADY_WRITES) -> list[tuple[list[WriteSite], int, list[str]]]:
    """Per allocating 64 KiB write after the first (which allocates the L2 table): (writes, flushes, trace)."""
    img.write(0, b"\x01" * CS)
    out = []
    for i in range(1, n + 1):
        counted.reset()
        img.write(i * CS, bytes([i]) * CS)
        out.append((list(counted.writes), counted.flushes, list(counted.trace)))
    return out


@pytest.mark.parametrize("mode", ["writethrough", "directsync"])
def test_lazy_off_flushing_modes_cost_at_most_two_flushes_and_three_writes(mode):
    img, counted = open_counted(lazy=False, mode=mode)
    for writes, flushes, trace in steady_state(img, counted):
        assert len(writes) <= 3 and flushes <= 2, trace
        # The data, the refcount block that counts it, then the L2 table that exposes it.
        assert writes == [WriteSite.DATA, WriteSite.REFBLOCK, WriteSite.L2], trace
        assert trace.index("refblock") < trace.index("F") < trace.index("l2"), trace
        assert trace[-1] == "F", trace


@pytest.mark.parametrize("mode", ["writethrough", "directsync"])
def test_lazy_on_flushing_modes_cost_exactly_one_flush_and_two_writes(mode):
    img, counted = open_counted(lazy=True, mode=mode)
    for writes, flushes, trace in steady_state(img, counted):
        assert writes == [WriteSite.DATA, WriteSite.L2], trace
        assert flushes == 1, trace
        assert trace == ["data", "l2", "F"], trace


@pytest.mark.parametrize("lazy", [False, True])
def test_writeback_costs_one_write_and_no_flush(lazy):
    img, counted = open_counted(lazy=lazy, mode="writeback")
    for writes, flushes, trace in steady_state(img, counted):
        assert writes == [WriteSite.DATA], trace
        assert flushes == 0, trace


def test_lazy_saves_one_flush_and_one_write_per_allocating_write():
    """The headline figure: 3 writes + 2 flushes become 2 writes + 1 flush (facts §2.2, "Key figure")."""
    totals = {}
    for lazy in (False, True):
        img, counted = open_counted(lazy=lazy, mode="writethrough")
        per = steady_state(img, counted, n=16)
        totals[lazy] = (sum(len(w) for w, _, _ in per), sum(f for _, f, _ in per))
    assert totals[False] == (48, 32)
    assert totals[True] == (32, 16)


def test_first_write_on_fresh_lazy_image_sets_dirty_bit_with_flush_before_l2_update():
    img, counted = open_counted(lazy=True, mode="writethrough")
    img.write(0, b"\x5a" * CS)
    trace = counted.trace
    # QEMU's sequence (facts §2.2): R F L2 F L1 F D H F L2 F.
    assert trace == ["refblock", "F", "l2-alloc", "F", "l1", "F", "data", "dirty-bit", "F", "l2", "F"], trace
    dirty = trace.index("dirty-bit")
    assert trace[dirty + 1] == "F"
    assert trace.index("l2", dirty) > dirty + 1
    assert img.dirty
    assert counted.inner.getvalue()[79] & 1, "dirty bit must be on disk"


def test_first_write_lazy_off_has_qemus_five_flushes():
    img, counted = open_counted(lazy=False, mode="writethrough")
    img.write(0, b"\x5a" * CS)
    assert counted.trace == ["refblock", "F", "l2-alloc", "F", "l1", "F", "data", "refblock", "F", "l2", "F"]
    assert not img.dirty


def test_dirty_bit_written_once_per_session():
    img, counted = open_counted(lazy=True, mode="writethrough")
    for i in range(6):
        img.write(i * CS, b"\x01" * CS)
    assert counted.writes.count(WriteSite.DIRTY_BIT) == 1


def test_rewrite_of_allocated_cluster_is_one_write_one_flush():
    """Overwriting an allocated cluster touches no metadata, lazy or not."""
    for lazy in (False, True):
        img, counted = open_counted(lazy=lazy, mode="writethrough")
        img.write(0, b"\x01" * CS)
        counted.reset()
        img.write(512, b"\x02" * 4096)
        assert counted.trace == ["data", "F"], (lazy, counted.trace)


def test_flush_with_nothing_written_is_free():
    img, counted = open_counted(lazy=True, mode="writeback")
    img.write(0, b"\x01" * CS)
    img.flush()
    counted.reset()
    img.flush()
    assert counted.trace == []


def test_lazy_clean_close_writes_refblocks_then_header():
    img, counted = open_counted(lazy=True, mode="writethrough")
    img.write(0, b"\x01" * CS)
    counted.reset()
    img.close()
    # QEMU's close with lazy=on: R F H F (facts §2.2).
    assert counted.trace == ["refblock", "F", "header", "F"]
    assert not counted.inner.getvalue()[79] & 1


@pytest.mark.parametrize("lazy, expected", [(True, ["data", "l2", "F"]), (False, ["data", "refblock", "F", "l2", "F"])])
def test_partial_write_into_a_new_cluster_at_eof_costs_the_same(lazy, expected):
    """4 KiB into a fresh cluster at the end of the file: the cluster is written whole (zeros around the data);
    nothing stale can show through, so no extra flush (QEMU on a plain file: fallocate + D + L2 F, facts §2.2)."""
    img, counted = open_counted(lazy=lazy, mode="writethrough")
    img.write(0, b"\x01" * CS)
    for i in range(1, 5):
        counted.reset()
        img.write(i * CS + 8192, b"\x02" * 4096)
        assert counted.trace == expected


def test_write_into_a_reused_cluster_flushes_data_before_the_l2_entry():
    """A freed cluster below EOF may hold another guest offset's old data: the data write is flushed before the
    L2 entry that exposes it (qcrash's rule, stricter than QEMU's; see the module docstring of cluster_write.py)."""
    img, counted = open_counted(lazy=True, mode="writeback")
    img.write(0, b"\x01" * CS)
    img.write(CS, b"\x02" * CS)
    img.flush()
    freed = img._lookup(0)[2]
    img.discard(0, CS)
    img.flush()
    counted.reset()
    img.write(5 * CS, b"\x03" * 512)
    assert img._lookup(5 * CS)[2] == freed, "the write should reuse the freed cluster"
    img.flush()
    trace = counted.trace
    assert trace.index("data") < trace.index("F") < trace.index("l2"), trace
