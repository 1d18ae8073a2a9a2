"""CopyOnWriteFile's extents mode (large images: writes laid over the bytes, never a whole copy) against a plain MemoryFile and against its copy mode."""

from __future__ import annotations

import random

import pytest

from harness.crashstates.images import Extents, as_bytes
from harness.targets import OpenOptions, RecoveryPath
from harness.targets.readmemo import ReadMemo
from harness.targets.python import CopyOnWriteFile, PythonTarget, RecordingFile
from models.blockio import MemoryFile
from models.qcow2.errors import HostIOError
from tests.differential.test_check_fast_vs_full import CONFIGS, _workload


def _bytes(image):
    return None if image is None else as_bytes(image)


def _random_ops(rng: random.Random, size: int, n: int):
    for _ in range(n):
        roll = rng.random()
        if roll < 0.1:
            yield "truncate", rng.randrange(0, size * 2), None
        elif roll < 0.55:
            offset = rng.randrange(0, size * 2)
            yield "pwrite", offset, rng.randbytes(rng.choice((1, 8, 512, 4096, rng.randrange(1, 20000))))
        else:
            yield "pread", rng.randrange(0, size * 2), rng.randrange(0, 30000)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cls", [CopyOnWriteFile, RecordingFile])
def test_extents_mode_reads_and_ends_as_a_plain_file(seed: int, cls, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CopyOnWriteFile, "_EXTENTS_FROM", 1024)
    monkeypatch.setattr(CopyOnWriteFile, "_MAX_EXTENTS", 24)  # compaction is exercised too
    rng = random.Random(seed)
    base = rng.randbytes(rng.randrange(1024, 50000))
    cow, plain = cls(base), MemoryFile(base)
    assert cow.pristine()
    for op, offset, arg in _random_ops(rng, len(base), 300):
        if op == "pread":
            assert cow.pread(offset, arg) == plain.pread(offset, arg), (op, offset, arg)
        elif op == "pwrite":
            cow.pwrite(offset, arg)
            plain.pwrite(offset, arg)
        else:
            cow.truncate(offset)
            plain.truncate(offset)
        assert cow.size() == plain.size()
    assert cow._over is not None, "the extents mode was not used"
    assert not cow.pristine()
    assert cow.getvalue() == plain.getvalue()
    assert base == cow.buf  # the image bytes themselves were never changed


def test_extents_mode_refuses_growth_past_max_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CopyOnWriteFile, "_EXTENTS_FROM", 16)
    cow = CopyOnWriteFile(bytes(64), name="big.qcow2")
    cow.max_size = 128
    cow.pwrite(0, b"x")
    with pytest.raises(HostIOError, match="big.qcow2"):
        cow.pwrite(120, bytes(16))
    with pytest.raises(HostIOError, match="big.qcow2"):
        cow.truncate(4096)
    assert cow.size() == 64


@pytest.mark.parametrize("cfg", CONFIGS[::3], ids=lambda c: f"cs{c[0]}-rc{c[1]}")
def test_recovery_in_extents_mode_equals_copy_mode(cfg: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every recovery path of crash images gives the same recovered bytes, lines and log either way."""
    from harness.crashstates import CrashImageBuilder, Policy, enumerate_states

    log = _workload(cfg, sum(cfg) % 613).log
    builder = CrashImageBuilder(log)
    target = PythonTarget()
    images = {builder.build_bytes(s) for p in range(1, len(log) + 1, max(1, len(log) // 6))
              for s in enumerate_states(log, p, Policy.SUBSETS, k=3, seed=p, samples=2)}
    assert images
    wrote = 0
    for image in sorted(images)[:12]:
        for path in RecoveryPath:
            monkeypatch.setattr(CopyOnWriteFile, "_EXTENTS_FROM", 1 << 62)
            copy = target.recover_checked(image, path, OpenOptions(), record=True)
            monkeypatch.setattr(CopyOnWriteFile, "_EXTENTS_FROM", 0)
            over = target.recover_checked(image, path, OpenOptions(), record=True)
            assert _bytes(over[0].image) == copy[0].image and over[0].error == copy[0].error
            # (a file laid over as extents hands its image on as extents, never joined)
            assert over[0].image is None or type(over[0].image) is Extents or over[0].image is image
            assert list(over[0].messages) == list(copy[0].messages) and over[0].events == copy[0].events
            assert over[1] == copy[1]
            if copy[0].log is not None:
                assert over[0].log.ops == copy[0].log.ops
            wrote += copy[0].image is not None and copy[0].image != image
    assert wrote, "no recovery wrote anything: the extents mode went untested"


def _as_extents(image: bytes, rng: random.Random) -> Extents:
    """`image` as extents over several immutable pieces (as a crash image of a large image's log lies)."""
    ext = Extents(image)
    for _ in range(rng.randrange(1, 6)):
        lo = rng.randrange(len(image))
        hi = min(len(image), lo + rng.randrange(1, 100000))
        ext.put(lo, hi, bytes(image[lo:hi]), 0)  # (the same bytes, from another buffer)
    return ext


@pytest.mark.parametrize("cfg", CONFIGS[1::3], ids=lambda c: f"cs{c[0]}-rc{c[1]}")
def test_judging_an_image_as_extents_equals_judging_its_bytes(cfg: tuple) -> None:
    """Every judging function of the python target gives the same result on an image handed over as `Extents` as on
    its joined bytes, with and without the read memo; a recovered image stays extents and reads the same."""
    from harness.crashstates import CrashImageBuilder, Policy, enumerate_states

    log = _workload(cfg, sum(cfg) % 613).log
    builder = CrashImageBuilder(log)
    target = PythonTarget()
    rng = random.Random(sum(cfg))
    images = sorted({builder.build_bytes(s) for p in range(1, len(log) + 1, max(1, len(log) // 5))
                     for s in enumerate_states(log, p, Policy.SUBSETS, k=3, seed=p, samples=2)})[:8]
    assert images
    recovered = 0
    for image in images:
        ext = _as_extents(image, rng)
        assert ext.join() == image and len(ext) == len(image)
        assert target.inspect(ext) == target.inspect(image)
        assert target.check(ext, past_eof=True) == target.check(image, past_eof=True)
        sectors = frozenset(range(0, 64))
        assert target.read_only(ext, sectors) == target.read_only(image, sectors)
        for reuse in (None, ReadMemo()):
            extra = {} if reuse is None else {"reuse": reuse}
            for _twice in range(2 if reuse else 1):  # (the second time from the memo: replayed over extents)
                assert target.read_only(ext, sectors, **extra) == target.read_only(image, sectors)
                for path in RecoveryPath:
                    got, known = target.recover_checked(ext, path, OpenOptions(), record=True, **extra)
                    want, known_b = target.recover_checked(image, path, OpenOptions(), record=True)
                    assert _bytes(got.image) == _bytes(want.image) and got.error == want.error and known == known_b
                    assert list(got.messages) == list(want.messages) and got.events == want.events
                    if want.log is not None:
                        assert got.log.ops == want.log.ops and as_bytes(got.log.base) == as_bytes(want.log.base)
                    if got.image is not None:
                        assert type(got.image) is Extents  # (never joined on the judge's path)
                        recovered += 1
        public = target.recover(ext, RecoveryPath.OPEN, OpenOptions())
        assert public.image is None or type(public.image) is bytes  # (the seam's own recover hands bytes)
    assert recovered
