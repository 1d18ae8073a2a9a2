"""The open path's leak repair without qemu-img's re-check ("Double checking the fixed image now...") against the
repair with it: the re-check only reads, and its result was never used, so every recovery must come out the same.

`PythonTarget.recover` by the open path runs once with the re-check and once without it;
the recovered bytes, the recovery's host-operation log, its printed lines, its events and
its error must be equal. On the crash images a fuzz run's sweeps judged (examples whose
crash images leak by the hundred: 512-byte clusters, 64-bit refcounts, eager), and on seeded crash images of every configuration class with copies whose
metadata bytes are flipped.
"""

from __future__ import annotations

import random

import pytest

import harness.targets.python as pythontarget
from harness.crashstates.images import as_bytes
from harness.fuzz.engine import run_example
from harness.targets import OpenOptions, RecoveryPath
from tests.differential.test_check_fast_vs_full import CONFIGS, _seeded_images


def _recovery(image: bytes, recheck: bool, monkeypatch) -> tuple:
    monkeypatch.setattr(pythontarget, "_LEAK_REPAIR_DOUBLE_CHECK", recheck)
    rec = pythontarget.PythonTarget().recover(image, RecoveryPath.OPEN, OpenOptions())
    log = None if rec.log is None else [(op.kind, op.offset, bytes(op.data), op.site, op.size_after) for op in rec.log]
    return rec.image, log, tuple(rec.messages), rec.events, rec.error


def _compare(images: list[bytes], monkeypatch, what: str) -> int:
    """Both recoveries of every image must agree; returns how many repaired leaks."""
    repaired = 0
    for image in images:
        want = _recovery(image, True, monkeypatch)
        assert _recovery(image, False, monkeypatch) == want, f"{what}: the recovery differs without the re-check"
        repaired += "leaks repaired" in want[3]
    return repaired


@pytest.mark.parametrize("example", [25, 30])  # (dev, seed 7: 512 B clusters, 64-bit refcounts, eager)
def test_the_crash_images_of_a_sweep_recover_alike(example: int, monkeypatch) -> None:
    seen: list[bytes] = []
    real = pythontarget.PythonTarget.recover_checked

    def recording(self, raw, *args, **kwargs):
        seen.append(as_bytes(raw))
        return real(self, raw, *args, **kwargs)

    monkeypatch.setattr(pythontarget.PythonTarget, "recover_checked", recording)
    run_example((example, 7, {}, "dev", [], False))
    monkeypatch.undo()
    images = random.Random(example).sample(seen, min(len(seen), 40))
    assert _compare(images, monkeypatch, f"dev example {example}") >= 5, "too few of the images leaked"


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] < 1 << 21],
                         ids=lambda c: f"cs{c[0]}-rc{c[1]}-v{c[2]}-{'lazy' if c[3] else 'eager'}")
def test_seeded_crash_images_recover_alike(cfg: tuple, monkeypatch) -> None:
    _compare(_seeded_images(cfg), monkeypatch, f"config {cfg}")
