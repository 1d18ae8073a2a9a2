"""The recovery judge: one crash state gives one finding or none, with the verdict its phase carries."""

from __future__ import annotations

import random
import struct

import pytest

from harness.config import Config
from harness.crashstates import CrashState, Policy, enumerate_states
from harness.judge import Judge, Judged, Where
from harness.ops import Flush, Write
from harness.oracle import Finding, Verdict
from harness.points import Budget
from harness.runner import Runner
from harness.stats import Stats
from harness.targets import OpenOptions, Recovery, RecoveryPath, UnknownTarget
from harness.targets.python import PythonTarget
from models.payload import make_payload
from models.qcow2.spec import IncompatFeature
from models.qcow2.structs import FIELD_OFFSET

SMALL = dict(cluster_size=512, virtual_size=1 << 20)
INCOMPAT = FIELD_OFFSET["incompatible_features"]


def set_incompat(raw: bytes, flags: int) -> bytes:
    (old,) = struct.unpack_from(">Q", raw, INCOMPAT)
    out = bytearray(raw)
    struct.pack_into(">Q", out, INCOMPAT, old | flags)
    return bytes(out)


class DirtyAfter(PythonTarget):
    """A python target whose recovery leaves the dirty bit set: always, or only when recovering a crashed recovery."""

    def __init__(self, *, only_unrecorded: bool) -> None:
        super().__init__()
        self.only_unrecorded = only_unrecorded

    def recover(self, raw: bytes, path: RecoveryPath, options: OpenOptions, *, record: bool = True) -> Recovery:
        rec = super().recover(raw, path, options, record=record)
        if rec.image is None or (self.only_unrecorded and record):
            return rec
        return Recovery(set_incompat(rec.image, IncompatFeature.DIRTY), rec.log, rec.messages, rec.events)


def judge_last_point(target: PythonTarget, *, corrupt_header: bool = False,
                     budget: Budget = Budget(recovery_points=2)) -> tuple[Judged, CrashState]:
    """Run two lazy-refcount writes on `target`, then judge the crash state 'everything kept' at the last point."""
    config = Config(lazy_refcounts=True, cache_mode="writeback", **SMALL)
    runner = Runner(config, seed=2, budget=Budget(sweep=False), target=target)
    for op in [Write(0, 1024, 1), Write(4096, 512, 2), Flush()]:
        assert runner.step(op) == []
    log = target.log
    state = enumerate_states(log, len(log), Policy.PREFIX)[0]
    image = runner.executor.builder.build(state)
    if corrupt_header:
        # Clear the dirty bit of a lazy image whose refcounts lag: corruption the header does not admit.
        (flags,) = struct.unpack_from(">Q", image, INCOMPAT)
        struct.pack_into(">Q", image, INCOMPAT, flags & ~IncompatFeature.DIRTY)
    judge = Judge(target, budget, seed=2, rng=random.Random(0), stats=Stats())
    return judge.judge(Where(2, "Flush", state), image, runner.model, log, deep=True), state


def test_a_healthy_crash_state_gives_no_finding_and_the_recovered_image() -> None:
    target = PythonTarget()
    judged, _state = judge_last_point(target)
    assert judged.finding is None
    assert judged.recovered is not None and judged.view is not None
    assert judged.view[0] == make_payload(0, 0, 1024, 1)[:512], "the view is what the read-only open read"
    assert not target.inspect(judged.recovered).dirty


def test_corruption_behind_a_clear_dirty_bit_is_one_raw_finding() -> None:
    judged, state = judge_last_point(PythonTarget(), corrupt_header=True)
    assert isinstance(judged.finding, Finding)
    assert judged.finding.verdict is Verdict.CORRUPTION_WITHOUT_DIRTY
    assert (judged.finding.phase, judged.finding.crash_id, judged.finding.op_kind) == ("raw", state.id, "Flush")
    assert judged.recovered is None


@pytest.mark.parametrize("only_unrecorded, phase, verdict", [
    (False, "recovery", Verdict.NOT_CLEAN_AFTER_REPAIR),
    # Only the recovery of a crashed recovery leaves the bit: the same failure is non-idempotent repair.
    (True, "recovery-crash", Verdict.REPAIR_NOT_IDEMPOTENT),
])
def test_a_dirty_bit_left_by_recovery_gets_the_verdict_of_its_phase(only_unrecorded, phase, verdict) -> None:
    judged, state = judge_last_point(DirtyAfter(only_unrecorded=only_unrecorded))
    finding = judged.finding
    assert finding is not None and finding.verdict is verdict and finding.phase == phase
    assert finding.rule  # the contract sentence of that verdict
    assert "incompatible_features=0x1" in finding.evidence
    assert ("recovery crashed at [" in finding.evidence) == only_unrecorded


def test_runner_rejects_an_unknown_target_with_the_choices() -> None:
    with pytest.raises(UnknownTarget, match=r"target = 'nope'.*choose one of 'python', 'qemu'"):
        Runner(Config(**SMALL), target="nope")


def test_the_recovery_path_is_the_budgets_and_named_in_the_evidence() -> None:
    # `check -r leaks` cannot rebuild the refcounts a lazy-refcounts crash leaves behind (as in QEMU).
    judged, _state = judge_last_point(PythonTarget(), budget=Budget(recovery_paths=("check-leaks",)))
    finding = judged.finding
    assert finding is not None and finding.verdict is Verdict.REPAIR_FAILED and finding.phase == "recovery"
    assert finding.evidence.endswith("(recovered by check-leaks)")
    judged, _state = judge_last_point(PythonTarget(), budget=Budget(recovery_paths=("check-all",)))
    assert judged.finding is None and judged.recovered is not None


@pytest.mark.parametrize("wrong", [None, 0, 7, 16, 17, 40])
def test_closed_reads_by_runs_find_the_sector_one_by_one_finds(wrong, monkeypatch) -> None:
    # After a clean close the view's sectors are compared with the model by runs of consecutive
    # sectors; the sector reported is the first that a compare of one sector at a time reports.
    # Runs are cut short (_CLOSED_RUN) to have several, and the sectors have a gap and an untouched one.
    import harness.judge as judgemod
    from models.refdisk import ReferenceDisk

    monkeypatch.setattr(judgemod, "_CLOSED_RUN", 8)
    model = ReferenceDisk(1 << 20)
    order = list(range(0, 20)) + [33] + list(range(40, 50))
    for s in order:
        if s != 33:  # 33 was never written: it reads zero
            model.write(s * 512, make_payload(1, s * 512, 512, 9))
    sectors = {s: model.read(s * 512, 512) for s in order}
    if wrong is not None:
        sectors[wrong] = b"\x01" * 512
        sectors[max(order)] = b"\x02" * 512  # a later one too: the first is reported
    one_by_one = next((s for s in sorted(sectors) if sectors[s] != model.read(s * 512, 512)), None)
    assert judgemod.first_closed_mismatch(sectors, model) == one_by_one == wrong
