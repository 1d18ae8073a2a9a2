"""The python target's read memo (harness/targets/readmemo.py) against fresh checks and recoveries, on seeded crash images.

Every image is checked and recovered twice: with a warm `ReadMemo` shared by all images
of its configuration, and on its own with none. Everything observable must be equal: the
check summary; the recovery's image bytes, messages, events, error and known check, and
its host-operation log (kind, offset, bytes, site, size after each op). Besides the crash
images and their metadata mutations, each image gets variants with bytes changed where
its first recovery read nothing (which the memo must answer) and where it read something
(which it must not answer from that read set).
"""

from __future__ import annotations

import random

import pytest

from harness.targets import OpenOptions, RecoveryPath
from harness.targets.python import PythonTarget
from harness.targets.readmemo import ReadMemo
from models.blockio import CacheMode
from tests.differential.test_check_fast_vs_full import CONFIGS, _crash_images, _mutated

PATHS = (RecoveryPath.OPEN, RecoveryPath.CHECK_ALL, RecoveryPath.CHECK_LEAKS)


def _observable(rec_known) -> tuple:
    rec, known = rec_known
    log = None if rec.log is None else (rec.log.base, [(op.kind, op.offset, bytes(op.data), op.site, op.size_after)
                                                       for op in rec.log.ops])
    return rec.image, tuple(rec.messages), rec.events, rec.error, known, log


def _outcome(run):
    """What a call returned, or the exception it raised (type and text)."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - both sides must raise alike
        return ("raised", type(exc).__name__, str(exc))


def _last_read_set(reuse: ReadMemo, kind: str) -> tuple:
    keys = [k for k in reuse._calls if k[1] == kind]
    return next(reversed(reuse._calls[keys[-1]]))


def _flipped(image: bytes, pos: int) -> bytes:
    out = bytearray(image)
    out[pos] ^= 0x5A
    return bytes(out)


def _outside(read_set: tuple, size: int, rng: random.Random) -> int | None:
    """A byte of the image that no range of `read_set` covers, or None."""
    covered = bytearray(size)
    for offset, length in read_set:
        covered[offset:offset + length] = b"\x01" * len(covered[offset:offset + length])
    free = [i for i in range(0, size, 97) if not covered[i]]
    return rng.choice(free) if free else None


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] <= 1 << 16],
                         ids=lambda c: f"cs{c[0]}-rc{c[1]}-v{c[2]}-{'lazy' if c[3] else 'eager'}")
def test_reused_results_equal_fresh_ones(cfg: tuple) -> None:
    target = PythonTarget()
    reuse = ReadMemo()
    seed = sum(cfg) % 7919
    rng = random.Random(seed)
    images = _crash_images(cfg, seed, per_config=3)
    images += [_mutated(image, cfg[0], rng) for image in images]
    options = OpenOptions(CacheMode.WRITEBACK, None)
    compared = replayed = 0
    queue = list(images)
    while queue:
        image = queue.pop(0)
        raw_check = _outcome(lambda: target.check(image, reuse=reuse))
        assert raw_check == _outcome(lambda: target.check(image))
        for path in PATHS:
            for record in (True, False):
                hits = reuse.hits
                handed = raw_check if not isinstance(raw_check, tuple) else None
                got = _outcome(lambda: _observable(target.recover_checked(image, path, options, record=record,
                                                                          raw_check=handed, reuse=reuse)))
                want = _outcome(lambda: _observable(target.recover_checked(image, path, options, record=record)))
                assert got == want, f"{cfg} {path} record={record}: replay differs"
                compared += 1
                replayed += reuse.hits > hits
        if len(images) < 40:  # variants of the first images: one where nothing was read, one where something was
            read_set = _last_read_set(reuse, "recover")
            pos = _outside(read_set, len(image), rng)
            if pos is not None:
                images.append(_flipped(image, pos))
                queue.append(images[-1])
            offset, length = rng.choice([r for r in read_set if r[1]])
            images.append(_flipped(image, min(offset + rng.randrange(length), len(image) - 1)))
            queue.append(images[-1])
    assert compared >= 6 * len(images) // 2
    assert replayed, "no recovery was replayed: the comparison proved nothing about reuse"


def _view(view) -> tuple:
    return view.sectors, view.allocated, view.changed, view.error


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] <= 1 << 16],
                         ids=lambda c: f"cs{c[0]}-rc{c[1]}-v{c[2]}-{'lazy' if c[3] else 'eager'}")
def test_replayed_read_plans_equal_fresh_reads(cfg: tuple) -> None:
    """A read-only open replayed from a read plan reads exactly what a fresh open reads, whatever the file's size."""
    target = PythonTarget()
    reuse = ReadMemo()
    seed = sum(cfg) % 7919 + 1
    rng = random.Random(seed)
    images = _crash_images(cfg, seed, per_config=3)
    images += [_mutated(image, cfg[0], rng) for image in images]
    sector_count = cfg[4] // 512
    touched = frozenset(rng.sample(range(sector_count), 24)) | {sector_count - 1}
    compared = replayed = 0
    queue = list(images)
    while queue:
        image = queue.pop(0)
        for allocated in (True, False):
            hits = reuse.hits
            got = _outcome(lambda: _view(target.read_only(image, touched, allocated=allocated, reuse=reuse)))
            want = _outcome(lambda: _view(target.read_only(image, touched, allocated=allocated)))
            assert got == want, f"{cfg} allocated={allocated}: a replayed read plan differs from a fresh read"
            compared += 1
            replayed += reuse.hits > hits
        if len(images) < 48:
            # The same metadata with other guest data, a shorter and a longer file, and a change where the open read.
            read_set = _last_read_set(reuse, "read_only")
            pos = _outside(read_set, len(image), rng)
            variants = [] if pos is None else [_flipped(image, pos)]
            variants += [image[:max(0, len(image) - cfg[0] - 7)], image + bytes(cfg[0] + 3), image[:50]]
            offset, length = rng.choice([r for r in read_set if r[1]] or [(0, 1)])
            variants.append(_flipped(image, min(offset + rng.randrange(length), len(image) - 1)))
            images += variants
            queue += variants
    assert compared >= len(images)
    assert replayed, "no read-only open was replayed: the comparison proved nothing about read plans"


def _host_of_a_sector(image: bytes, view, rng: random.Random) -> int | None:
    """The host offset of a sector of `view` that lies in a plain data cluster of `image`, or None."""
    from models.blockio import MemoryFile
    from models.qcow2 import Qcow2Image
    from models.qcow2.entries import ClusterType

    if not view.allocated:
        return None
    img = Qcow2Image.open(MemoryFile(image), readonly=True)
    try:
        guest = rng.choice(view.allocated)
        _entry, ctype, host = img._lookup(guest)
        return host if ctype is ClusterType.NORMAL and host + 512 <= len(image) else None
    finally:
        img.release()


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] <= 1 << 16][::2],
                         ids=lambda c: f"cs{c[0]}-rc{c[1]}-v{c[2]}-{'lazy' if c[3] else 'eager'}")
def test_view_fingerprints_are_equal_exactly_when_the_views_are(cfg: tuple) -> None:
    """ReadOnlyView.fingerprint, on fresh and replayed read-only opens of crash images and of copies with other
    guest data: equal fingerprints hold equal sectors (the judge then compares no sectors), and views of the same
    sectors with unequal fingerprints differ."""
    target = PythonTarget()
    reuse = ReadMemo()
    seed = sum(cfg) % 7919 + 3
    rng = random.Random(seed)
    images = _crash_images(cfg, seed, per_config=6) + _crash_images(cfg, seed + 2, per_config=6)
    touched = frozenset(rng.sample(range(cfg[4] // 512), 24))
    views = []
    for image in list(images):
        first = target.read_only(image, touched, reuse=reuse)
        views.append(first)
        pos = _outside(_last_read_set(reuse, "read_only"), len(image), rng)
        if pos is not None:  # the same metadata, other unread bytes: a replayed plan
            views.append(target.read_only(_flipped(image, pos), touched, reuse=reuse))
        host = _host_of_a_sector(image, first, rng)
        if host is not None:  # the same metadata, a guest sector's bytes changed where they lie: a replayed plan
            views.append(target.read_only(_flipped(image, host + rng.randrange(512)), touched, reuse=reuse))
        views.append(target.read_only(image, touched, reuse=reuse))  # (its plan replayed on the bytes it read)
    printed = [v for v in views if v.fingerprint is not None]
    assert len(printed) >= len(images), "few read-only opens carried a fingerprint"
    shortcut = differ = 0
    for i, a in enumerate(printed):
        for b in printed[i + 1:]:
            if a.fingerprint == b.fingerprint:
                assert a.sectors == b.sectors, f"{cfg}: equal fingerprints, different sectors"
                shortcut += a.sectors is not b.sectors
            elif a.sectors.keys() == b.sectors.keys():
                assert a.sectors != b.sectors, f"{cfg}: the same sectors, unequal fingerprints"
                differ += 1
    assert shortcut, "no two distinct views shared a fingerprint: the judge's shortcut was not exercised"
    assert differ, "no two views of the same sectors differed: unequal fingerprints were not compared"


def test_replayed_writes_are_asked_for_by_their_digest_before_joining() -> None:
    """replay_writes hands `image_for` the digest of the bytes it would join; what it returns is the result."""
    from harness.imagememo import digest
    from harness.targets.readmemo import replay_writes

    rng = random.Random(5)
    base = bytes(rng.randrange(256) for _ in range(9000))
    ops = ((100, b"x" * 700), (8000, b"y" * 3000), (5000, None), (4000, b""), (6000, b"z" * 10))
    want = replay_writes(base, ops)
    asked: list[bytes] = []

    def unknown(key: bytes, join) -> bytes:
        asked.append(key)
        return join()

    assert replay_writes(base, ops, unknown) == want
    assert asked == [digest(want)]
    held = bytes(want)
    assert replay_writes(base, ops, lambda key, join: held if key == digest(held) else join()) is held


def test_consecutive_replays_share_unchanged_sectors_and_read_changed_ones() -> None:
    """A plan replayed on images that differ only in guest data: each view equals a fresh read; an image read
    just as the last one was gets that very dict back, and a changed run gets new sector objects."""
    cfg = CONFIGS[0]
    target = PythonTarget()
    reuse = ReadMemo()
    image = next(i for i in _crash_images(cfg, 11, per_config=3) if len(i) > 4 * cfg[0])
    touched = frozenset(range(0, 64))
    first = target.read_only(image, touched, reuse=reuse)
    read_set = _last_read_set(reuse, "read_only")
    data_sector = next((s for s, v in first.sectors.items() if any(v)), None)
    assert data_sector is not None, "the image holds no guest data: nothing to vary"
    rng = random.Random(3)
    variants = [image]
    for _ in range(6):  # guest data changed where the open read no metadata
        pos = _outside(read_set, len(image), rng)
        assert pos is not None
        variants.append(_flipped(variants[-1] if rng.random() < 0.5 else image, pos))
    views = []
    for variant in variants + variants[::-1]:
        got = target.read_only(variant, touched, reuse=reuse)
        fresh = target.read_only(variant, touched)
        assert _view(got) == _view(fresh), "a replay differs from a fresh read"
        # (in the same order too: a replay that changed some runs updates a copy of the last view's dict)
        assert list(got.sectors) == list(fresh.sectors), "a replay lists its sectors in another order"
        views.append(got)
    again = target.read_only(variants[0], touched, reuse=reuse)
    assert _view(again) == _view(views[-1])
    assert again.sectors is views[-1].sectors, "an image read just as the last one was did not share its view"
    changed = [v for v in views if v.sectors != first.sectors]
    assert changed, "no variant changed a sector the open read: the comparison proved nothing"


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] <= 1 << 16 and c[3]],
                         ids=lambda c: f"cs{c[0]}-rc{c[1]}-v{c[2]}-lazy")
def test_crashed_recoveries_reuse_the_final_check_and_equal_fresh_ones(cfg: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crashes of one recovery recover to the bytes it left: their final checks come from the memo
    (`python._final_check`, from 256 KiB on: lowered here) while the recoveries themselves run, and
    everything equals a fresh recovery."""
    from harness.crashstates import CrashImageBuilder, Policy, enumerate_states
    from harness.targets import python

    monkeypatch.setattr(python, "_FINAL_CHECK_MEMO_FROM", 0)

    target = PythonTarget()
    reuse = ReadMemo()
    options = OpenOptions(CacheMode.WRITEBACK, None)
    seed = sum(cfg) % 7919 + 2
    final_hits = compared = 0
    lookup = reuse.lookup

    def counting(key, data):
        nonlocal final_hits
        found = lookup(key, data)
        final_hits += found is not None and key[1] == "final check"
        return found

    reuse.lookup = counting  # type: ignore[method-assign]
    for image in _crash_images(cfg, seed, per_config=4):
        rec, _known = target.recover_checked(image, RecoveryPath.OPEN, options, record=True, reuse=reuse)
        if rec.log is None or not len(rec.log):
            continue
        builder = CrashImageBuilder(rec.log)
        for point in range(1, len(rec.log) + 1, max(1, len(rec.log) // 6)):
            for sub in enumerate_states(rec.log, point, Policy.SUBSETS, k=4, seed=seed, samples=2):
                crashed = builder.build_bytes(sub)
                got = _outcome(lambda: _observable(target.recover_checked(crashed, RecoveryPath.OPEN, options,
                                                                          record=False, reuse=reuse)))
                want = _outcome(lambda: _observable(target.recover_checked(crashed, RecoveryPath.OPEN, options,
                                                                           record=False)))
                assert got == want, f"{cfg} [{sub.id}]: a recovery with the memo differs from a fresh one"
                compared += 1
    assert compared, "no recovery wrote anything: nothing was crashed"
    assert final_hits, "no final check came from the memo: the comparison proved nothing about it"


def test_digest_over_extents_equals_the_digest_over_their_joined_bytes() -> None:
    """digest_of reads an image laid out as Extents where it lies: the same digest as over the joined bytes,
    ranges past the end included (a recovery's final check is keyed so, without joining its image)."""
    from harness.crashstates.images import Extents
    from harness.targets.readmemo import digest_of

    rng = random.Random(9)
    base = bytes(rng.randrange(256) for _ in range(20000))
    image = Extents(base)
    for _ in range(40):
        offset = rng.randrange(24000)
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 900)))
        image.grow(offset + len(data))
        image.put(offset, offset + len(data), data, 0)
    image.cut(23000)
    joined = image.join()
    ranges = tuple(sorted((rng.randrange(25000), rng.randrange(0, 3000)) for _ in range(60)))
    assert digest_of(image, ranges) == digest_of(joined, ranges)
    assert digest_of(image, ranges) != digest_of(joined[:-1], ranges)


def test_a_replayed_run_of_many_pieces_reads_as_its_pieces_one_by_one() -> None:
    """A replayed run of several pieces (image slices, some past the image's end; zeros; bytes read through the
    file) reads the same bytes as `_piece` for each piece, joined (the read-plan tests above replay runs of one
    piece: their images' guest data is contiguous)."""
    from harness.targets import ReadOnlyView
    from harness.targets import python as pythonmod

    rng = random.Random(9)
    past_end = 0
    for _ in range(300):
        raw = rng.randbytes(rng.randrange(4096, 16384))
        plan = pythonmod.ReadPlan()
        pieces: list[tuple[int, int | bytes]] = []
        for _ in range(rng.randrange(2, 12)):
            length = 512 * rng.randrange(1, 4)
            kind = rng.choice(("raw", "raw", "zeros", "const"))
            if kind == "raw":
                piece: tuple[int, int | bytes] = (rng.randrange(0, len(raw) + 1024), length)
                past_end += piece[0] + length > len(raw)
            else:
                piece = (pythonmod.ZEROS, length) if kind == "zeros" else (pythonmod.CONST, rng.randbytes(length))
            plan.piece(*piece)
            pieces.append(piece)
        count = sum(d if isinstance(d, int) else len(d) for _h, d in pieces) // 512
        recorded = b"".join(pythonmod._piece(raw, h, d) for h, d in pieces)
        plan.end_run(0, count, pythonmod.run_digest(recorded))
        plan.finish(ReadOnlyView())
        for image in (raw, raw + bytes(700)):  # (the second replay of a plan starts from its first's view)
            want = b"".join(pythonmod._piece(image, h, d) for h, d in pieces)
            view = plan.replay(image)
            got = view.sectors
            assert b"".join(got[s] for s in range(count)) == want, f"pieces {[(h, len(d) if isinstance(d, bytes) else d) for h, d in pieces]}"
            assert (view.fingerprint == plan._fingerprint([pythonmod.run_digest(recorded)])) == (want == recorded)
    assert past_end > 20, "few pieces ran past the image's end: the zero-padded case was barely compared"
