"""The checker package (fast path) against the pre-split reference (full path) on seeded crash images of every configuration class.

Each image is checked and repaired by both, each on its own copy behind a recording
file; they must agree on the counts, the printed lines, the exit status, every write
the repair made (offset, bytes, site, in order; the reference zeroes each freed cluster
in its own write, the fast path adjacent freed clusters in one, so adjacent zero writes
are merged on both sides before comparing), the repaired bytes, and qcrash's past-EOF
steps. Images: crash states of seeded random workloads (lazy and eager
refcounts, every cluster-size class, every refcount width), plus copies with metadata
bytes flipped to reach the error paths (unaligned tables, reserved bits, overflow,
rebuilds).
"""

from __future__ import annotations

import random

import pytest

from harness.crashstates import CrashImageBuilder, Policy, enumerate_states
from harness.faultfile import FaultInjectingFile
from models.blockio import CacheMode, MemoryFile, WriteSite
from models.qcow2 import Qcow2Image
from models.qcow2 import check as fast
from models.qcow2.errors import Qcow2Error
from models.qcow2.header import read_header
from tests.differential import reference_check as full

# (cluster size, refcount bits, version, lazy refcounts, virtual size): each cluster-size
# class (512 B, 4 KiB, 64 KiB, 2 MiB) and each refcount width appear at least once.
CONFIGS = [
    (512, 16, 3, True, 1 << 20),
    (512, 1, 3, True, 1 << 20),
    (512, 4, 3, False, 1 << 20),
    (512, 16, 2, False, 1 << 20),
    (4096, 2, 3, True, 4 << 20),
    (4096, 8, 3, True, 4 << 20),
    (4096, 64, 3, False, 4 << 20),
    (65536, 16, 3, True, 16 << 20),
    (65536, 32, 3, True, 16 << 20),
    (1 << 18, 2, 3, True, 16 << 20),  # sub-byte refcount blocks viewed packed (PackedView)
    (1 << 21, 16, 3, True, 16 << 20),
    (1 << 21, 1, 3, False, 16 << 20),
]
FIXES = (fast.Fix.NONE, fast.Fix.LEAKS, fast.Fix.ALL)


def _workload(cfg: tuple, seed: int) -> FaultInjectingFile:
    """A created image, then seeded guest writes, zeroes, discards and flushes, left unclosed (as at a crash)."""
    cluster_size, refcount_bits, version, lazy, size = cfg
    rng = random.Random(seed)
    base = MemoryFile(name="diff.qcow2")
    Qcow2Image.create(base, size, version=version, cluster_size=cluster_size, refcount_bits=refcount_bits,
                      lazy_refcounts=lazy)
    ff = FaultInjectingFile(base)
    img = Qcow2Image.open(ff, cache_mode=CacheMode.WRITEBACK, lazy_refcounts=lazy)
    sectors = size // 512
    for _ in range(rng.randrange(6, 14)):
        start = rng.randrange(sectors)
        count = min(rng.choice((1, 2, 8, cluster_size // 512, 3 * cluster_size // 512)), sectors - start)
        roll = rng.random()
        if roll < 0.6:
            img.write(start * 512, bytes([rng.randrange(1, 256)]) * (count * 512))
        elif roll < 0.7:
            img.write_zeroes(start * 512, count * 512)
        elif roll < 0.8:
            img.discard(start * 512, count * 512)
        else:
            img.flush()
    return ff


def _crash_images(cfg: tuple, seed: int, per_config: int) -> list[bytes]:
    log = _workload(cfg, seed).log
    rng = random.Random(seed)
    builder = CrashImageBuilder(log)
    points = sorted(rng.sample(range(1, len(log) + 1), min(len(log), per_config)))
    images = []
    for point in points:
        for policy in (Policy.SUBSETS, Policy.TRUNCATE):
            for state in enumerate_states(log, point, policy, k=3, seed=seed, samples=1)[:1]:
                images.append(bytes(builder.build(state)))
    return images


def _mutated(image: bytes, cluster_size: int, rng: random.Random) -> bytes:
    """Flip a few bytes in the first metadata clusters (reftable, refblock, L1, L2), never in the header."""
    out = bytearray(image)
    end = min(len(out), 6 * cluster_size)
    for _ in range(rng.randrange(1, 4)):
        pos = rng.randrange(cluster_size, end) if end > cluster_size else 0
        if pos >= 104:
            out[pos] = rng.choice((0, 0xFF, 1, 0x80, rng.randrange(256)))
    return bytes(out)


def _run(module, image: bytes, fix: fast.Fix, past_eof) -> tuple:
    """Everything observable of one check (and repair) on its own copy of `image`."""
    f = FaultInjectingFile(MemoryFile(image, name="diff.qcow2"))
    try:
        result = module.repair(f, module.Fix(int(fix))) if fix else module.check(f)
    except Qcow2Error as exc:
        return ("raised", type(exc).__name__)
    writes = _merge_zero_runs([(op.kind, op.offset, bytes(op.data), op.site) for op in f.log.ops])
    counts = (result.corruptions, result.leaks, result.check_errors, result.corruptions_fixed, result.leaks_fixed,
              result.image_end_offset, result.total_clusters, result.allocated_clusters,
              result.fragmented_clusters, result.compressed_clusters)
    findings = [(str(x.kind), x.cluster, x.refcount, x.reference, x.message) for x in result.findings]
    flags = (result.error, result.rebuilt, result.double_checked, result.consistent_after_fix, module.exit_code(result))
    first = result.first_pass
    first_counts = None if first is None else (first.corruptions, first.leaks, first.check_errors, first.error)
    human = module.format_human(result, "diff.qcow2", bool(fix))
    extra = None
    if fix and result.error is None:
        extra = (module.refcounts_past_eof(f), module.drop_refcounts_past_eof(f))
    return counts, findings, flags, first_counts, human, writes, extra, f.inner.getvalue()


def _merge_zero_runs(writes: list[tuple]) -> list[tuple]:
    """The write log with each run of adjacent all-zero repair writes as one write."""
    out: list[tuple] = []
    for kind, offset, data, site in writes:
        if out and site is WriteSite.REPAIR and out[-1][3] is WriteSite.REPAIR and kind == out[-1][0] \
                and out[-1][1] + len(out[-1][2]) == offset and not any(data) and not any(out[-1][2]):
            out[-1] = (kind, out[-1][1], out[-1][2] + data, site)
        else:
            out.append((kind, offset, data, site))
    return out


def _header_ok(image: bytes) -> bool:
    try:
        read_header(MemoryFile(image), writable=False, check_mode=True)
    except Qcow2Error:
        return False
    return True


def _seeded_images(cfg: tuple) -> list[bytes]:
    """The crash images both comparisons run on: seeded crash states of one workload, and (below 2 MiB
    clusters) two seeded mutations of each."""
    seed = sum(cfg) % 9973  # deterministic, differs per configuration
    rng = random.Random(seed)
    images = _crash_images(cfg, seed, per_config=4)
    if cfg[0] < 1 << 21:
        # (Not with 2 MiB clusters: a flipped reftable entry there can make a data cluster
        # full of non-zero bytes count as a refcount block of millions of entries, which
        # the reference walks entry by entry for minutes.)
        images += [_mutated(image, cfg[0], rng) for image in images for _ in range(2)]
    return images


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"cs{c[0]}-rc{c[1]}-v{c[2]}-{'lazy' if c[3] else 'eager'}")
def test_fast_path_agrees_with_full_path(cfg: tuple) -> None:
    images = _seeded_images(cfg)
    compared = 0
    for image in images:
        if not _header_ok(image):
            # The one header parser refuses it; the old checker's own parser had other rules.
            assert _run(fast, image, fast.Fix.NONE, None)[0] == "raised"
            continue
        for fix in FIXES:
            want = _run(full, image, fix, None)
            got = _run(fast, image, fix, None)
            assert got == want, f"config {cfg}, fix {fix!r}: fast path differs from the full path"
            compared += 1
    assert compared >= 3 * len(images) // 2, "too few images got past the header to compare anything"


@pytest.mark.parametrize("size", [512, 1 << 17])  # decoded whole below 64 KiB, scanned byte-wise above
@pytest.mark.parametrize("order", range(7))
def test_vectorised_refblock_decoding_agrees_with_get_refcount(order: int, size: int) -> None:
    from models.qcow2.check.imrt import PackedView, decode_refblock, nonzero_refcounts, nonzero_subbyte
    from models.qcow2.geometry import get_refcount

    rng = random.Random(order)
    block = bytes(rng.choice((0, 0, 0, rng.randrange(256))) for _ in range(size))
    entries = size * 8 >> order
    want = [get_refcount(block, i, order) for i in range(entries)]
    assert list(decode_refblock(block, order)) == want
    limit = entries - 3
    assert nonzero_refcounts(block, order, limit) == [i for i in range(limit) if want[i]]
    if order < 3:
        # Large sub-byte blocks are viewed packed (read and written in place) and scanned from any entry.
        start = entries // 3 + 1
        assert nonzero_subbyte(block, order, start, limit) == [i for i in range(start, limit) if want[i]]
        packed = bytearray(block)
        view = PackedView(packed, order)
        assert len(view) == entries and [view[i] for i in range(entries)] == want
        for i in (0, start, entries - 1):
            view[i] = (want[i] + 1) % (1 << (1 << order))
            assert get_refcount(packed, i, order) == view[i] != want[i]


@pytest.mark.parametrize("size", [512, 4096 + 8, 1 << 16])  # walked below 8 KiB, numpy from there
def test_nonzero_table_entries_agree_with_struct(size: int) -> None:
    import struct

    from models.qcow2.scan import nonzero_u64_items

    rng = random.Random(size)
    raw = bytes(rng.choice((0, 0, 0, 0, 0, 0, 0, rng.randrange(256))) for _ in range(size + 5))
    entries = struct.unpack(f">{size // 8}Q", raw[:size])
    assert nonzero_u64_items(raw[:size]) == [(i, e) for i, e in enumerate(entries) if e]
    assert nonzero_u64_items(bytearray(raw[:size + 5])) == [(i, e) for i, e in enumerate(entries) if e]


@pytest.mark.parametrize("density", [0.0, 0.001, 0.3, 1.0])
def test_nonzero_bytes_found_word_wise_agree_with_a_byte_walk(density: float) -> None:
    from models.qcow2.scan import nonzero_bytes

    rng = random.Random(int(density * 1000))
    buf = bytearray(rng.randrange(1, 256) if rng.random() < density else 0 for _ in range(5000))
    for start, end in [(0, 5000), (3, 4999), (7, 8), (8, 16), (13, 13), (4093, 5000), (1, 4096)]:
        assert nonzero_bytes(buf, start, end).tolist() == [i for i in range(start, end) if buf[i]], (start, end)


@pytest.mark.parametrize("words, set_", [(8191, 3), (8192, 0), (8192 + 77, 5), (1 << 18, 4), (1 << 18, 30000)])
def test_nonzero_words_found_block_by_block_agree_with_flatnonzero(words: int, set_: int) -> None:
    import numpy

    from models.qcow2.check.imrt import nonzero_entries
    from models.qcow2.scan import nonzero_bytes, nonzero_u64_items, nonzero_words

    rng = random.Random(words + set_)
    table = numpy.zeros(words, dtype=numpy.uint64)
    where = sorted(rng.sample(range(words), set_) + ([words - 1] if set_ else []))
    table[where] = [rng.randrange(1, 1 << 64) for _ in where]
    assert nonzero_words(table).tolist() == sorted(set(where))
    raw = table.byteswap().tobytes()  # as a big-endian table on disk
    assert nonzero_u64_items(raw) == [(i, int(table[i])) for i in sorted(set(where))]
    import array

    assert nonzero_entries(array.array("Q", table.tobytes()), 5) == [i for i in sorted(set(where)) if i >= 5]
    byte_walk = numpy.flatnonzero(numpy.frombuffer(raw, dtype=numpy.uint8)).tolist()  # the byte-wise scan it replaced
    assert nonzero_bytes(raw, 0, len(raw)).tolist() == byte_walk
    assert nonzero_bytes(raw, 3, len(raw) - 3).tolist() == [i for i in byte_walk if 3 <= i < len(raw) - 3]


def _repaired(image: bytes, fix: fast.Fix, recorded: bool) -> tuple:
    """A repair on a recording file or a plain in-memory one; with the recording file, how many cluster-sized or longer zero writes it made."""
    inner = MemoryFile(image, name="diff.qcow2")
    f = FaultInjectingFile(inner) if recorded else inner
    try:
        result = fast.repair(f, fix)
    except Qcow2Error as exc:
        return ("raised", type(exc).__name__), 0
    cs = 1 << int.from_bytes(image[20:24], "big")
    runs = sum(len(op.data) >= cs and not any(op.data) and op.site is WriteSite.REPAIR
               for op in f.log.ops) if recorded else 0
    findings = [(str(x.kind), x.cluster, x.refcount, x.reference, x.message) for x in result.findings]
    counts = (result.corruptions, result.leaks, result.check_errors, result.corruptions_fixed, result.leaks_fixed,
              result.error, result.rebuilt, fast.exit_code(result))
    return (counts, findings, inner.getvalue()), runs


@pytest.mark.parametrize("cfg", CONFIGS[:-2] + [CONFIGS[-2]], ids=lambda c: f"cs{c[0]}-rc{c[1]}-v{c[2]}-{'lazy' if c[3] else 'eager'}")
def test_recording_file_repairs_as_the_memory_file_does(cfg: tuple) -> None:
    # The same repair behind a recording file (whose write log the judge crashes) and on a
    # plain in-memory file: same result, same bytes, and freed clusters were zeroed.
    images = _seeded_images(cfg)
    zero_writes = 0
    for image in images:
        if not _header_ok(image):
            continue
        for fix in (fast.Fix.LEAKS, fast.Fix.ALL):
            want, runs = _repaired(image, fix, recorded=True)
            got, _ = _repaired(image, fix, recorded=False)
            assert got == want, f"config {cfg}, fix {fix!r}: the recording file's repair differs from the memory file's"
            zero_writes += runs
    assert zero_writes > 0, "no repair freed a cluster, so the zeroed runs were not compared"


def _cold_runs(images: list[bytes], clear) -> list:
    """Every check and repair of `images` on the fast path, each with a memo emptied by `clear` just before it."""
    out = []
    for image in images:
        for fix in FIXES:
            clear()
            out.append(_run(fast, image, fix, None))
    return out


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] <= 1 << 16], ids=lambda c: f"cs{c[0]}-rc{c[1]}-v{c[2]}-{'lazy' if c[3] else 'eager'}")
def test_block_memo_replays_what_the_compare_computes(cfg: tuple) -> None:
    # (Not with 2 MiB clusters: their blocks are never memoised, see blockmemo._MAX_BLOCK.)
    # compare_refcounts answers a block it compared before from models/qcow2/check/blockmemo:
    # every check and repair with a warm memo (all images checked once already) must be
    # what it is with the memo emptied before it, down to the writes and the final bytes.
    from models.qcow2.check import blockmemo

    images = [image for image in _seeded_images(cfg) if _header_ok(image)]
    cold = _cold_runs(images, blockmemo.clear)
    hits = blockmemo.stats["hits"]
    warm = [_run(fast, image, fix, None) for image in images for fix in FIXES]
    assert warm == cold, f"config {cfg}: a replayed block verdict differs from the computed one"
    assert blockmemo.stats["hits"] > hits, "the warm pass replayed nothing, so nothing was compared"


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] <= 1 << 16 and c[1] >= 8],
                         ids=lambda c: f"cs{c[0]}-rc{c[1]}-v{c[2]}-{'lazy' if c[3] else 'eager'}")
def test_dry_pass_memo_replays_what_the_blocks_compare(cfg: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    # A dry compare pass over whole arrays is answered from blockmemo.dry_pass when the same
    # on-disk refcounts met the same counts before (from `_VECTOR_FROM` clusters: lowered
    # here so every seeded image takes the vectorised pass; sub-byte widths never do). Every
    # check and repair with a warm memo must be what it is cold, and what the reference computes.
    from models.qcow2.check import blockmemo, refcounts

    monkeypatch.setattr(refcounts, "_VECTOR_FROM", 0)
    images = [image for image in _seeded_images(cfg) if _header_ok(image)]
    cold = _cold_runs(images, blockmemo.clear)
    blockmemo.clear()
    first = [_run(fast, image, fix, None) for image in images for fix in FIXES]  # (each image's passes remembered)
    hits, lines = blockmemo.stats["pass_hits"], blockmemo.stats["pass_lines"]
    warm = [_run(fast, image, fix, None) for image in images for fix in FIXES]
    assert first == cold and warm == cold, f"config {cfg}: a replayed dry pass differs from the computed one"
    assert warm == [_run(full, image, fix, None) for image in images for fix in FIXES]
    if not lines:
        pytest.skip("no seeded image of this configuration has refcounts that differ from its references")
    assert blockmemo.stats["pass_hits"] > hits, "the warm pass replayed no dry pass"


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"cs{c[0]}-rc{c[1]}-v{c[2]}-{'lazy' if c[3] else 'eager'}")
def test_l2_memo_replays_what_the_walk_counts(cfg: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    # calculate_refcounts answers a plain L2 table it walked before from models/qcow2/check/l2memo
    # (from `_WALK_MEMO_FROM` clusters on: lowered here, should it be raised again): every check and
    # repair with a warm memo must be what it is with the memo emptied before it, and what the
    # reference (full path) computes.
    from models.qcow2.check import l2memo, refcounts

    monkeypatch.setattr(refcounts, "_WALK_MEMO_FROM", 0)

    images = [image for image in _seeded_images(cfg) if _header_ok(image)]
    cold = _cold_runs(images, l2memo.clear)
    found = l2memo.stats["hits"] + l2memo.stats["declined"]
    warm = [_run(fast, image, fix, None) for image in images for fix in FIXES]
    assert warm == cold, f"config {cfg}: a replayed L2 walk differs from the walked one"
    assert warm == [_run(full, image, fix, None) for image in images for fix in FIXES]
    # (A remembered table is replayed or declined: past EOF, or a count at refcount_max.)
    if not any(l2memo._memo.values()):
        pytest.skip("no crash image of this workload links a non-empty plain L2 table")
    assert l2memo.stats["hits"] + l2memo.stats["declined"] > found, "the warm pass met no remembered table"


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"cs{c[0]}-rc{c[1]}-v{c[2]}-{'lazy' if c[3] else 'eager'}")
def test_vectorised_compare_agrees_with_the_block_loop(cfg: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    # compare_refcounts diffs whole arrays from 1,024 clusters on (refcounts._compare_vectorised); the
    # seeded images are smaller, so the threshold is lowered to take that path on every one of them.
    # Every check and repair must equal the block loop's and the reference's, and the path must
    # have diffed some images itself (not declined them all: sub-byte entries and EIO are declined).
    from models.qcow2.check import refcounts

    images = [image for image in _seeded_images(cfg) if _header_ok(image)]
    loop = [_run(fast, image, fix, None) for image in images for fix in FIXES]
    taken = reused = 0
    vectorised = refcounts._compare_vectorised

    def counting(s, imrt, fix, again=False):
        nonlocal taken, reused
        reused += again and s.compared_disk is not None  # (the fixing pass takes the dry pass's array)
        done = vectorised(s, imrt, fix, again)
        taken += done is not None
        return done

    monkeypatch.setattr(refcounts, "_VECTOR_FROM", 1)
    monkeypatch.setattr(refcounts, "_compare_vectorised", counting)
    diffed = [_run(fast, image, fix, None) for image in images for fix in FIXES]
    assert diffed == loop, f"config {cfg}: the vectorised compare differs from the block loop"
    assert diffed == [_run(full, image, fix, None) for image in images for fix in FIXES]
    if cfg[1] < 8:
        assert not taken, "sub-byte refcounts must be declined"
    else:
        assert taken, "the vectorised compare declined every image: it was never compared"
    if cfg[1] >= 8 and cfg[0] <= 65536:  # (these seeded images have repairs whose fixing pass follows a dry one)
        assert reused, "no fixing pass took the dry pass's on-disk refcounts: that path was never compared"


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"cs{c[0]}-rc{c[1]}-v{c[2]}-{'lazy' if c[3] else 'eager'}")
def test_copied_flags_found_right_by_arrays_agree_with_the_loop(cfg: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    # check_oflag_copied skips its loop when array compares find every COPIED flag right
    # (refcounts._copied_all_right, from 1,024 clusters on: lowered here). Every check and repair must equal the loop's, on the
    # seeded images and their metadata mutations (wrong flags among them).
    from models.qcow2.check import refcounts

    images = [image for image in _seeded_images(cfg) if _header_ok(image)]
    answers: list[bool] = []
    right = refcounts._copied_all_right

    def noting(s):
        answers.append(right(s))
        return answers[-1]

    monkeypatch.setattr(refcounts, "_COPIED_ARRAYS_FROM", 1)  # (the seeded images may be below the threshold)
    monkeypatch.setattr(refcounts, "_copied_all_right", noting)
    fast_runs = [_run(fast, image, fix, None) for image in images for fix in FIXES]
    monkeypatch.setattr(refcounts, "_copied_all_right", lambda s: False)
    loop_runs = [_run(fast, image, fix, None) for image in images for fix in FIXES]
    assert fast_runs == loop_runs, f"config {cfg}: skipping the COPIED loop changed a check or a repair"
    if cfg[1] >= 8:
        assert True in answers, "no image had its flags found right by the arrays: the skip was never compared"


class _ReadNoting(MemoryFile):
    """A MemoryFile that notes every read in order, and fails its `fail_at`-th read with EIO (as an error point would)."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        super().__init__(data, name="diff.qcow2")
        self.reads: list[tuple[int, int]] = []
        self.fail_at = fail_at

    def pread(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        if len(self.reads) == self.fail_at:
            from models.qcow2.errors import HostIOError

            raise HostIOError(self.name, "read", offset, length, 5, "injected")
        return super().pread(offset, length)


def _observed(image: bytes, fix: fast.Fix, fail_at: int | None = None) -> tuple:
    """One check or repair on a read-noting copy: its outcome, its reads in order, and the bytes it left."""
    f = _ReadNoting(image, fail_at)
    try:
        result = fast.repair(f, fix) if fix else fast.check(f)
        outcome = (fast.format_human(result, "diff.qcow2", bool(fix)), fast.exit_code(result), result.error)
    except Qcow2Error as exc:
        outcome = ("raised", type(exc).__name__, str(exc))
    return outcome, f.reads, bytes(f.buf)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"cs{c[0]}-rc{c[1]}-v{c[2]}-{'lazy' if c[3] else 'eager'}")
def test_count_memo_replays_what_the_count_computes(cfg: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    # calculate_refcounts answers tables it counted before from models/qcow2/check/calcmemo. With
    # the memo off, then on (a first pass that fills it, a second that finds every count in it), every
    # check and repair must be the same, down to the writes and the final bytes, and make the same
    # reads in the same order (a read-set memo above it keys by them; error points count them).
    from models.qcow2.check import calcmemo, refcounts

    images = [image for image in _seeded_images(cfg) if _header_ok(image)]
    monkeypatch.setattr(refcounts, "_COUNT_MEMO", False)
    plain = [_run(fast, image, fix, None) for image in images for fix in FIXES]
    plain_reads = [_observed(image, fix) for image in images for fix in FIXES]
    monkeypatch.setattr(refcounts, "_COUNT_MEMO", True)
    calcmemo.clear()
    hits, misses = calcmemo.stats["hits"], calcmemo.stats["misses"]
    for _pass in range(2):
        assert [_run(fast, image, fix, None) for image in images for fix in FIXES] == plain, \
            f"config {cfg}: a replayed count differs from the counted one"
        assert [_observed(image, fix) for image in images for fix in FIXES] == plain_reads, \
            f"config {cfg}: a replayed count read other ranges, or in another order"
    assert plain == [_run(full, image, fix, None) for image in images for fix in FIXES]
    if cfg[0] > calcmemo._MAX_CLUSTER_SIZE:  # (a replay would hold every large table it read)
        assert (calcmemo.stats["hits"], calcmemo.stats["misses"]) == (hits, misses), "large clusters are memoised"
        return
    assert calcmemo.stats["hits"] > hits, "no count was replayed, so none was compared"
    assert calcmemo.stats["misses"] > misses, "no replay missed, so the counts that follow a miss were not compared"


@pytest.mark.parametrize("cfg", CONFIGS[:2] + CONFIGS[4:5], ids=lambda c: f"cs{c[0]}-rc{c[1]}-v{c[2]}")
def test_count_memo_fails_each_read_where_the_count_does(cfg: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    # A failing read (an error point) in the memo's replay must fail the check exactly where the
    # count's own read would: the count takes the replay's reads (and its error) instead of reading again.
    from models.qcow2.check import calcmemo, refcounts

    images = [image for image in _seeded_images(cfg) if _header_ok(image)][:4]
    hits, misses = calcmemo.stats["hits"], calcmemo.stats["misses"]  # (process-wide: counted from here)
    for image in images:
        total = len(_observed(image, fast.Fix.ALL)[1])
        for fail_at in range(1, total + 1):
            monkeypatch.setattr(refcounts, "_COUNT_MEMO", False)
            plain = _observed(image, fast.Fix.ALL, fail_at)
            monkeypatch.setattr(refcounts, "_COUNT_MEMO", True)
            _observed(image, fast.Fix.ALL)  # (the count remembered)
            assert _observed(image, fast.Fix.ALL, fail_at) == plain, f"read {fail_at} of {total} failed elsewhere"
    assert calcmemo.stats["hits"] > hits, "no count was replayed, so no failing read met a replay"
    assert calcmemo.stats["misses"] > misses, "no replay missed, so no failing read met a missed replay's reads"
