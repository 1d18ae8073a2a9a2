"""The qemu target judged against the reference model: QEMU with its flushes switched off loses data the model calls durable; QEMU as shipped does not."""

from __future__ import annotations

import random

import pytest

from harness.config import Config
from harness.crashstates import CrashImageBuilder, Policy, enumerate_states
from harness.targets import RecoveryPath, get_target
from models.payload import make_payload
from models.refdisk import Mismatch, ReferenceDisk
from tests.conftest import requires_qemu

pytestmark = [pytest.mark.qemu, requires_qemu]

CONFIG = Config(cluster_size=4096, lazy_refcounts=True, cache_mode="writethrough", virtual_size=1 << 20)


def _run(extra_opts: str, seed: int):
    """A short seeded writethrough sequence; returns the target and, per guest op, (model at its end, its end point)."""
    rng = random.Random(seed)
    target = get_target("qemu", extra_opts=extra_opts)
    target.create(CONFIG)
    model = ReferenceDisk(CONFIG.virtual_size, CONFIG.cache_mode, discard_granularity=CONFIG.cluster_size)
    ends = []
    for i in range(6):
        offset = rng.randrange(0, CONFIG.virtual_size // 2, 512)
        data = make_payload(i, offset, 512 * rng.randint(1, 16), seed)
        model.begin_write(i, offset, data)
        target.write(offset, data)
        model.complete(i)
        ends.append((model.copy(), target.point()))
    return target, ends


def _lost_sectors(target, ends) -> list:
    """Judge the durable crash image (every unflushed write dropped) after each completed guest write."""
    builder = CrashImageBuilder(target.log)
    found = []
    for model, point in ends:
        state = enumerate_states(target.log, point, Policy.DROP_UNSYNCED)[0]
        raw = bytes(builder.build(state))
        if target.inspect(raw).error:
            continue  # nothing durable yet: not even a header
        view = target.read_only(raw, model.touched_sectors())
        found += model.judge(lambda off, n: b"".join(view.sectors.get(s, bytes(512))
                                                      for s in range(off // 512, (off + n) // 512)),
                             sorted(model.touched_sectors()))
    return found


def test_no_flush_qemu_is_reported_as_lost_data() -> None:
    # cache.no-flush=on drops every flush, so a completed writethrough write is not durable:
    # the oracle must say so (a harness that cannot fail this way tests nothing).
    target, ends = _run("cache.no-flush=on", seed=11)
    assert not any(op.kind == "flush" for op in target.log)
    verdicts = _lost_sectors(target, ends)
    assert verdicts and all(v.kind is Mismatch.STALE_OR_LOST for v in verdicts)
    target.abort()


def test_shipped_qemu_keeps_completed_writethrough_writes() -> None:
    target, ends = _run("", seed=11)
    assert _lost_sectors(target, ends) == []
    target.abort()


def test_dirty_crash_image_recovers_clean_by_every_path() -> None:
    target, ends = _run("", seed=3)
    raw = bytes(CrashImageBuilder(target.log).build(enumerate_states(target.log, target.point(), Policy.PREFIX)[0]))
    target.abort()
    assert target.inspect(raw).dirty
    before = target.read_only(raw, ends[-1][0].touched_sectors())
    assert before.error is None and before.changed is None
    for path in (RecoveryPath.OPEN, RecoveryPath.CHECK_ALL):
        rec = target.recover(raw, path, target.options)
        assert rec.error is None and rec.image is not None, rec
        assert not target.inspect(rec.image).dirty and not target.check(rec.image).problems
        after = target.read_only(rec.image, before.sectors)
        assert after.sectors == before.sectors
        assert rec.log is not None and len(rec.log) > 0
    # -r leaks cannot rebuild refcounts of a dirty image: QEMU says so instead of pretending.
    rec = target.recover(raw, RecoveryPath.CHECK_LEAKS, target.options)
    assert rec.error is not None and "rebuild" in rec.error
