"""CopyOnWriteFile's extents mode (large images: writes laid over the bytes, never a whole copy) against a plain MemoryFile and against its copy mode."""

from __future__ import annotations

import random

import pytest

from harness.targets import OpenOptions, RecoveryPath
from harness.targets.python import CopyOnWriteFile, PythonTarget, RecordingFile
from models.blockio import MemoryFile
from models.qcow2.errors import HostIOError
from tests.differential.test_check_fast_vs_full import CONFIGS, _workload


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
            assert over[0].image == copy[0].image and over[0].error == copy[0].error
            assert list(over[0].messages) == list(copy[0].messages) and over[0].events == copy[0].events
            assert over[1] == copy[1]
            if copy[0].log is not None:
                assert over[0].log.ops == copy[0].log.ops
            wrote += copy[0].image is not None and copy[0].image != image
    assert wrote, "no recovery wrote anything: the extents mode went untested"
