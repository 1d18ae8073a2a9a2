"""Unit tests of Qcow2Image semantics without QEMU: unaligned read-modify-write, write_zeroes and discard per version, cluster reuse, refcount-table growth, runtime lazy switching, dirty-bit handling, request and permission errors."""

from __future__ import annotations

import struct

import pytest

from models.blockio import CountingFile, MemoryFile, WriteSite
from models.qcow2 import spec
from models.qcow2.errors import ImageNotWritable, InvalidRequest
from models.qcow2.geometry import Geometry, get_refcount
from models.qcow2.image import Qcow2Image

KiB, MiB = 1 << 10, 1 << 20


# --------------------------------------------------------------------------- an independent oracle
def parse_image(buf: bytes) -> dict:
    """Decode the header fields this file needs straight from the bytes (not through models.qcow2)."""
    (magic, version, _bfo, _bfs, cluster_bits, size, _crypt, l1_size, l1_off, rt_off, rt_clusters,
     _nsnap, _snap_off) = struct.unpack_from(">IIQIIQIIQQIIQ", buf, 0)
    assert magic == spec.QCOW_MAGIC
    incompat = struct.unpack_from(">Q", buf, 72)[0] if version >= 3 else 0
    order = struct.unpack_from(">I", buf, 96)[0] if version >= 3 else 4
    return dict(version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_size, l1_off=l1_off,
                rt_off=rt_off, rt_clusters=rt_clusters, incompat=incompat, refcount_order=order)


def u64(buf: bytes, off: int) -> int:
    return struct.unpack_from(">Q", buf, off)[0] if off + 8 <= len(buf) else 0


def audit(buf: bytes) -> dict:
    """Recompute every reference from header, L1, L2 and refcount structures (as qemu-img check's IMRT)
    and compare with the refcounts on disk; return the findings (all empty for a consistent image)."""
    h = parse_image(buf)
    cs = 1 << h["cluster_bits"]
    geo = Geometry(h["cluster_bits"], h["refcount_order"])
    nb = (len(buf) + cs - 1) // cs
    refs = [0] * nb

    def ref(off: int, length: int) -> None:
        for c in range(off // cs, (off + length + cs - 1) // cs):
            assert c < nb + 1, f"reference to cluster {c} beyond EOF"
            if c < nb:
                refs[c] += 1

    ref(0, cs)
    ref(h["l1_off"], h["l1_size"] * 8)
    ref(h["rt_off"], h["rt_clusters"] * cs)
    l1 = [u64(buf, h["l1_off"] + 8 * i) for i in range(h["l1_size"])]
    l2_tables = []
    for e in l1:
        l2 = e & spec.L1E_OFFSET_MASK
        if l2:
            ref(l2, cs)
            l2_tables.append((e, l2))
    data_entries = []
    for _l1e, l2 in l2_tables:
        for j in range(cs // 8):
            e = u64(buf, l2 + 8 * j)
            host = e & spec.L2E_OFFSET_MASK
            if host:
                ref(host, cs)
                data_entries.append(e)
    rt = [u64(buf, h["rt_off"] + 8 * i) for i in range(h["rt_clusters"] * cs // 8)]
    for e in rt:
        if e & spec.REFT_OFFSET_MASK:
            ref(e & spec.REFT_OFFSET_MASK, cs)

    blocks: dict[int, bytes] = {}

    def on_disk(c: int) -> int:
        ri = c // geo.refblock_entries
        if ri >= len(rt) or not rt[ri] & spec.REFT_OFFSET_MASK:
            return 0
        start = rt[ri] & spec.REFT_OFFSET_MASK
        block = blocks.get(start)
        if block is None:
            block = blocks[start] = buf[start : start + cs].ljust(cs, b"\0")
        return get_refcount(block, c % geo.refblock_entries, geo.refcount_order)

    corruptions = [c for c in range(nb) if on_disk(c) < refs[c]]
    leaks = [c for c in range(nb) if on_disk(c) > refs[c]]
    copied = []
    for l1e, l2 in l2_tables:
        if bool(l1e & spec.QCOW_OFLAG_COPIED) != (on_disk(l2 // cs) == 1):
            copied.append(("L1", l1e))
    for e in data_entries:
        if bool(e & spec.QCOW_OFLAG_COPIED) != (on_disk((e & spec.L2E_OFFSET_MASK) // cs) == 1):
            copied.append(("L2", e))
    return {"corruptions": corruptions, "leaks": leaks, "copied": copied}


def assert_consistent(buf: bytes) -> None:
    found = audit(buf)
    assert found == {"corruptions": [], "leaks": [], "copied": []}, found


def fresh(size: int = 16 * MiB, **kw) -> MemoryFile:
    mem = MemoryFile(name="t.qcow2")
    Qcow2Image.create(mem, size, **kw)
    return mem


def l2_entry(mem: MemoryFile, guest: int) -> int:
    buf = mem.getvalue()
    h = parse_image(buf)
    cs = 1 << h["cluster_bits"]
    l1e = u64(buf, h["l1_off"] + 8 * (guest // (cs * (cs // 8))))
    l2 = l1e & spec.L1E_OFFSET_MASK
    return u64(buf, l2 + 8 * ((guest // cs) % (cs // 8))) if l2 else 0


def dirty_on_disk(mem: MemoryFile) -> bool:
    return bool(mem.getvalue()[79] & 1)


# --------------------------------------------------------------------------- create
@pytest.mark.parametrize("cs", [512, 4096, 65536, 2 * MiB])
@pytest.mark.parametrize("version", [2, 3])
def test_fresh_image_is_consistent_and_reads_zeros(cs, version):
    mem = fresh(8 * MiB, version=version, cluster_size=cs)
    assert_consistent(mem.getvalue())
    img = Qcow2Image.open(mem, readonly=True)
    assert img.read(0, 8 * MiB) == bytes(8 * MiB)
    assert img.hdr.version == version and img.geo.cluster_size == cs


def test_create_rounds_size_up_to_a_sector():
    mem = fresh(1000)
    assert Qcow2Image.open(mem, readonly=True).size == 1024


@pytest.mark.parametrize("kw, match", [
    (dict(version=4), r"compat/version 4"),
    (dict(cluster_size=1000), r"cluster_size = 1000: must be a power of two"),
    (dict(cluster_size=4 * MiB), r"cluster_size = 4194304"),
    (dict(refcount_bits=3), r"refcount_bits = 3"),
    (dict(refcount_bits=128), r"refcount_bits = 128"),
    (dict(version=2, refcount_bits=8), r"version 2 images require 16-bit refcounts"),
    (dict(version=2, lazy_refcounts=True), r"Lazy refcounts only supported with compatibility level 1.1"),
])
def test_create_refuses_bad_configs_by_name(kw, match):
    with pytest.raises(InvalidRequest, match=match):
        Qcow2Image.create(MemoryFile(name="bad.qcow2"), MiB, **kw)


# --------------------------------------------------------------------------- read-modify-write
@pytest.mark.parametrize("cs", [512, 4096, 65536])
def test_unaligned_writes_read_modify_write(cs):
    mem = fresh(4 * MiB, cluster_size=cs)
    img = Qcow2Image.open(mem)
    model = bytearray(4 * MiB)
    requests = [(1, 1), (cs - 3, 7), (cs * 3 + 100, cs * 2 + 17), (5, 3), (cs * 3 + 50, 100), (4 * MiB - 9, 9)]
    for n, (off, length) in enumerate(requests):
        data = bytes((n * 31 + i) % 251 + 1 for i in range(length))
        img.write(off, data)
        model[off : off + length] = data
        assert img.read(off, length) == data
    assert img.read(0, 4 * MiB) == bytes(model)
    img.close()
    assert_consistent(mem.getvalue())
    assert Qcow2Image.open(mem, readonly=True).read(0, 4 * MiB) == bytes(model)


def test_partial_write_into_new_cluster_zero_fills_the_rest():
    mem = fresh(MiB, cluster_size=4096)
    img = Qcow2Image.open(mem)
    img.write(4096 + 1000, b"\xaa" * 10)
    assert img.read(4096, 4096) == bytes(1000) + b"\xaa" * 10 + bytes(4096 - 1010)
    # The host cluster itself holds exactly that (no garbage around the write).
    img.close()
    host = l2_entry(mem, 4096) & spec.L2E_OFFSET_MASK
    assert mem.getvalue()[host : host + 4096] == bytes(1000) + b"\xaa" * 10 + bytes(4096 - 1010)


def test_overwrite_of_allocated_cluster_keeps_its_host_offset():
    mem = fresh(MiB, cluster_size=4096)
    img = Qcow2Image.open(mem)
    img.write(0, b"\x01" * 4096)
    img.flush()
    before = l2_entry(mem, 0)
    img.write(100, b"\x02" * 50)
    img.flush()
    assert l2_entry(mem, 0) == before
    assert before & spec.QCOW_OFLAG_COPIED


# --------------------------------------------------------------------------- write_zeroes
def test_write_zeroes_v3_whole_clusters_use_the_zero_flag():
    mem = fresh(MiB, version=3, cluster_size=4096)
    img = Qcow2Image.open(mem)
    img.write(0, b"\x11" * 8192)
    img.write_zeroes(0, 4096)  # allocated cluster -> ZERO_ALLOC, keeps its cluster and COPIED
    img.write_zeroes(3 * 4096, 4096)  # unallocated cluster -> ZERO_PLAIN
    img.write_zeroes(4096 + 100, 50)  # partial: zero bytes written into the data cluster
    img.close()
    e0, e1, e3 = l2_entry(mem, 0), l2_entry(mem, 4096), l2_entry(mem, 3 * 4096)
    assert e0 & spec.QCOW_OFLAG_ZERO and e0 & spec.L2E_OFFSET_MASK and e0 & spec.QCOW_OFLAG_COPIED
    assert e3 == spec.QCOW_OFLAG_ZERO
    assert not e1 & spec.QCOW_OFLAG_ZERO
    img = Qcow2Image.open(mem, readonly=True)
    assert img.read(0, 4096) == bytes(4096)
    assert img.read(4096, 4096) == b"\x11" * 100 + bytes(50) + b"\x11" * (4096 - 150)
    assert img.read(3 * 4096, 4096) == bytes(4096)
    assert_consistent(mem.getvalue())


def test_write_over_zero_alloc_cluster_reuses_it():
    mem = fresh(MiB, version=3, cluster_size=4096)
    img = Qcow2Image.open(mem)
    img.write(0, b"\x11" * 4096)
    img.flush()
    host = l2_entry(mem, 0) & spec.L2E_OFFSET_MASK
    img.write_zeroes(0, 4096)
    img.write(10, b"\x22")
    img.close()
    assert l2_entry(mem, 0) == host | spec.QCOW_OFLAG_COPIED
    assert Qcow2Image.open(mem, readonly=True).read(0, 4096) == bytes(10) + b"\x22" + bytes(4085)
    assert_consistent(mem.getvalue())


def test_write_zeroes_v2_writes_zero_data():
    mem = fresh(MiB, version=2, cluster_size=4096)
    img = Qcow2Image.open(mem)
    img.write(0, b"\x11" * 4096)
    img.write_zeroes(0, 4096)
    img.write_zeroes(8192, 4096)
    img.close()
    e0, e2 = l2_entry(mem, 0), l2_entry(mem, 8192)
    assert not e0 & spec.QCOW_OFLAG_ZERO and e0 & spec.L2E_OFFSET_MASK
    assert e2 & spec.L2E_OFFSET_MASK and not e2 & spec.QCOW_OFLAG_ZERO  # v2 has no zero flag: data is written
    img = Qcow2Image.open(mem, readonly=True)
    assert img.read(0, 3 * 4096) == bytes(3 * 4096)
    assert_consistent(mem.getvalue())


# --------------------------------------------------------------------------- discard and reuse
@pytest.mark.parametrize("version", [2, 3])
def test_discard_whole_clusters_only(version):
    mem = fresh(MiB, version=version, cluster_size=4096)
    img = Qcow2Image.open(mem)
    img.write(0, b"\x33" * 3 * 4096)
    img.discard(100, 3 * 4096 - 200)  # covers only cluster 1 entirely
    assert img.read(0, 4096) == b"\x33" * 4096
    assert img.read(4096, 4096) == bytes(4096)
    assert img.read(8192, 4096) == b"\x33" * 4096
    img.close()
    assert l2_entry(mem, 4096) == (spec.QCOW_OFLAG_ZERO if version >= 3 else 0)
    assert_consistent(mem.getvalue())


def test_discarded_cluster_is_reused_only_after_the_freeing_l2_update_is_durable():
    mem = fresh(MiB, cluster_size=4096)
    img = Qcow2Image.open(mem, cache_mode="writeback")
    img.write(0, b"\x44" * 4096)
    img.flush()
    freed = l2_entry(mem, 0) & spec.L2E_OFFSET_MASK
    img.discard(0, 4096)
    img.write(4096, b"\x55" * 4096)  # L2 change not yet durable: must not land on `freed`
    img.flush()
    first = l2_entry(mem, 4096) & spec.L2E_OFFSET_MASK
    assert first != freed
    img.write(8192, b"\x66" * 4096)  # after the flush, the freed cluster is reused
    img.flush()
    assert l2_entry(mem, 8192) & spec.L2E_OFFSET_MASK == freed
    img.close()
    img = Qcow2Image.open(mem, readonly=True)
    assert img.read(0, 3 * 4096) == bytes(4096) + b"\x55" * 4096 + b"\x66" * 4096
    assert_consistent(mem.getvalue())


def test_discard_reaching_the_end_of_an_unaligned_disk_discards_the_partial_last_cluster():
    # QEMU (qcow2_co_pdiscard): a request that is not cluster-aligned is ignored "except for the special case of
    # the complete partial cluster at the end of an unaligned file". Verified with qemu-io 7.2 on a 66048-byte
    # image: write -P 0x11 0 66048; discard 65536 512; read -P 0 65536 512 succeeds.
    mem = fresh(65536 + 512)
    img = Qcow2Image.open(mem)
    img.write(0, b"\x11" * (65536 + 512))
    img.discard(65536, 512)
    assert img.read(65536, 512) == bytes(512)


def test_discard_of_unallocated_range_writes_nothing():
    mem = fresh(MiB, cluster_size=4096)
    counted = CountingFile(mem)
    img = Qcow2Image.open(counted)
    counted.reset()
    img.discard(0, MiB)
    img.flush()
    assert counted.writes == []


# --------------------------------------------------------------------------- refcount table growth
@pytest.mark.parametrize("refcount_bits, size", [(64, 4 * MiB), (1, 136 * MiB)])
def test_refcount_table_growth_with_512_byte_clusters(refcount_bits, size):
    # 512-byte clusters: one reftable cluster holds 64 entries. With 64-bit refcounts a refblock counts
    # 64 clusters, so the first table covers 4096 clusters (2 MiB of host file); with 1-bit refcounts a
    # refblock counts 4096 clusters and the first table covers 128 MiB.
    mem = fresh(size, cluster_size=512, refcount_bits=refcount_bits)
    img = Qcow2Image.open(mem, cache_mode="writeback")
    start_rt = (img.hdr.refcount_table_offset, img.hdr.refcount_table_clusters)
    chunk = 64 * KiB if size <= 4 * MiB else 4 * MiB
    for n, off in enumerate(range(0, size, chunk)):
        img.write(off, bytes([n % 255 + 1]) * chunk)
    img.close()
    img = Qcow2Image.open(mem, readonly=True)
    assert (img.hdr.refcount_table_offset, img.hdr.refcount_table_clusters) != start_rt
    assert img.hdr.refcount_table_clusters > 1
    for n, off in enumerate(range(0, size, chunk)):
        assert img.read(off, chunk) == bytes([n % 255 + 1]) * chunk, f"guest offset {off:#x}"
    assert_consistent(mem.getvalue())


def test_refcount_overflow_is_refused_with_one_bit_refcounts():
    """A 1-bit refcount cannot count a second reference: the image must say so, not wrap."""
    from models.qcow2.errors import CorruptImage

    mem = fresh(MiB, cluster_size=512, refcount_bits=1)
    img = Qcow2Image.open(mem)
    with pytest.raises(CorruptImage, match=r"Invalid refcount: 1\+1 leaves 0\.\.1"):
        img.refcounts._update_refcount(0, +1)


# --------------------------------------------------------------------------- lazy refcounts and the dirty bit
def test_lazy_switch_on_then_off_at_runtime():
    mem = fresh(MiB, cluster_size=4096, lazy_refcounts=False)
    img = Qcow2Image.open(mem, cache_mode="writethrough")
    assert not img.lazy
    img.write(0, b"\x01" * 4096)
    assert not dirty_on_disk(mem)
    img.set_lazy_refcounts(True)
    img.write(4096, b"\x02" * 4096)
    assert img.dirty and dirty_on_disk(mem)
    assert audit(mem.getvalue())["corruptions"], "lazy: the new cluster's refcount is postponed"
    img.set_lazy_refcounts(False)  # marks the image clean: refcounts written, then the bit cleared
    assert not img.dirty and not dirty_on_disk(mem)
    assert_consistent(mem.getvalue())
    img.write(8192, b"\x03" * 4096)
    assert not dirty_on_disk(mem)
    assert_consistent(mem.getvalue())
    img.close()
    # The header's compatible bit is not changed by a runtime switch (as QEMU's reopen).
    assert not Qcow2Image.open(mem, readonly=True).lazy


def test_open_option_overrides_header_lazy_bit():
    mem = fresh(MiB, cluster_size=4096, lazy_refcounts=True)
    img = Qcow2Image.open(mem, lazy_refcounts=False)
    img.write(0, b"\x01" * 4096)
    assert not dirty_on_disk(mem)
    img.close()


def test_lazy_refused_on_v2_image():
    mem = fresh(MiB, version=2)
    with pytest.raises(InvalidRequest, match="Lazy refcounts require a qcow2 image with at least qemu 1.1"):
        Qcow2Image.open(mem, lazy_refcounts=True)
    img = Qcow2Image.open(mem)
    with pytest.raises(InvalidRequest, match="Lazy refcounts require"):
        img.set_lazy_refcounts(True)


def make_dirty(cs: int = 65536) -> MemoryFile:
    mem = fresh(128 * MiB, cluster_size=cs, lazy_refcounts=True)
    img = Qcow2Image.open(mem, cache_mode="writethrough")
    img.write(0, b"\x5a" * 512)
    img.abort()
    return mem


def test_abort_of_lazy_image_leaves_the_iotest039_state():
    mem = make_dirty()
    buf = mem.getvalue()
    assert dirty_on_disk(mem)
    # iotest 039 case 2, on disk: refblock 1,1,1,1,1,0; L1[0] -> 0x40000; L2[0] -> 0x50000 (facts §3).
    assert buf[0x20000:0x2000C] == bytes.fromhex("000100010001000100010000")
    assert u64(buf, 0x30000) == 0x8000000000040000
    assert u64(buf, 0x40000) == 0x8000000000050000
    assert buf[0x50000:0x50200] == b"\x5a" * 512
    found = audit(buf)
    assert found["corruptions"] == [5]
    assert found["copied"] == [("L2", 0x8000000000050000)]


def test_read_only_open_of_dirty_image_leaves_the_bit_set():
    mem = make_dirty()
    before = mem.getvalue()
    img = Qcow2Image.open(mem, readonly=True)
    assert img.dirty
    assert img.read(0, 512) == b"\x5a" * 512
    img.flush()
    img.close()
    assert mem.getvalue() == before, "a read-only open must not write anything"
    assert dirty_on_disk(mem)


def test_read_only_image_refuses_writes():
    mem = fresh(MiB)
    img = Qcow2Image.open(mem, readonly=True)
    for call in (lambda: img.write(0, b"x"), lambda: img.write_zeroes(0, 512), lambda: img.discard(0, 65536)):
        with pytest.raises(ImageNotWritable, match=r"t\.qcow2: .*read-only"):
            call()


def test_clean_close_without_lazy_never_touches_the_dirty_bit():
    mem = fresh(MiB, cluster_size=4096)
    counted = CountingFile(mem)
    img = Qcow2Image.open(counted)
    img.write(0, b"\x01" * 10000)
    img.close()
    assert WriteSite.DIRTY_BIT not in counted.writes
    assert WriteSite.HEADER not in counted.writes


def test_abort_writes_nothing_more():
    mem = fresh(MiB, cluster_size=4096, lazy_refcounts=True)
    img = Qcow2Image.open(mem, cache_mode="writeback")
    img.write(0, b"\x01" * 4096)
    snapshot = mem.getvalue()
    img.abort()
    assert mem.getvalue() == snapshot


# --------------------------------------------------------------------------- request validation
@pytest.mark.parametrize("call, match", [
    (lambda img: img.read(MiB - 1, 2), r"read offset=1048575 length=2: must lie within the virtual size 1048576"),
    (lambda img: img.write(-1, b"x"), r"write offset=-1 length=1"),
    (lambda img: img.write_zeroes(MiB, 1), r"write_zeroes offset=1048576 length=1"),
    (lambda img: img.discard(0, MiB + 512), r"discard offset=0 length=1049088"),
])
def test_out_of_range_requests_are_refused_by_name(call, match):
    img = Qcow2Image.open(fresh(MiB))
    with pytest.raises(InvalidRequest, match=r"t\.qcow2: " + match):
        call(img)


def test_requests_after_close_are_refused():
    img = Qcow2Image.open(fresh(MiB))
    img.close()
    with pytest.raises(InvalidRequest, match="on a closed image"):
        img.read(0, 1)
    img.close()  # idempotent


def test_zero_length_requests_are_no_ops():
    mem = fresh(MiB)
    counted = CountingFile(mem)
    img = Qcow2Image.open(counted, cache_mode="writeback")
    counted.reset()
    assert img.read(MiB, 0) == b""
    img.write(0, b"")
    img.write_zeroes(0, 0)
    img.discard(0, 0)
    assert counted.writes == []


def test_a_released_image_is_freed_without_the_cyclic_collector():
    """release() breaks the image's reference cycles (I/O choke point, helpers, caches): with 2 MiB clusters each
    image left to the collector held megabytes, and the judge collected after every crash state."""
    import gc
    import weakref

    from harness.targets.python import PythonTarget

    f = MemoryFile()
    Qcow2Image.create(f, 1 << 20, cluster_size=65536)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        img = Qcow2Image.open(f)
        img.write(0, b"x" * 512)
        img.close()
        img.release()
        ref = weakref.ref(img)
        del img
        assert ref() is None
        target = PythonTarget()  # the live image a reopen replaces goes the same way
        from harness.config import Config
        target.create(Config())
        old = weakref.ref(target.image)
        target.reopen(None, None)
        assert old() is None
    finally:
        if was_enabled:
            gc.enable()
