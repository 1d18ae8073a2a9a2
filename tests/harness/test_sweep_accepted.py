"""The views a sweep's model accepted (harness/judge.py, `Judge.sweep`): remembered inside one sweep only, and only as accepted."""

from __future__ import annotations

import random

from harness.judge import Judge
from harness.points import Budget
from harness.stats import Stats
from harness.targets.python import PythonTarget
from models.blockio import SECTOR
from models.refdisk import ReferenceDisk


class Counting(ReferenceDisk):
    """A reference disk that counts the views it judges."""

    judged = 0

    def judge_view(self, view):
        self.judged += 1
        return super().judge_view(view)


def _judge(fast: bool = True) -> Judge:
    return Judge(PythonTarget(), Budget(), 7, random.Random(7), Stats(), fast=fast)


def _model() -> Counting:
    model = Counting(1 << 20)
    model.write(0, b"\x11" * SECTOR)
    model.write(SECTOR, b"\x22" * SECTOR, op_index=1)
    return model


def test_an_equal_view_is_accepted_once_per_sweep() -> None:
    judge, model = _judge(), _model()
    good = {0: b"\x11" * SECTOR, 1: b"\x22" * SECTOR}
    with judge.sweep(model):
        assert judge._judge_view(model, good) == []
        assert judge._judge_view(model, dict(good)) == []  # an equal copy: not judged again
        assert model.judged == 1
    assert judge._judge_view(model, good) == []  # outside a sweep: judged every time
    assert model.judged == 2


def test_a_view_with_verdicts_is_judged_every_time() -> None:
    judge, model = _judge(), _model()
    bad = {0: b"\x33" * SECTOR, 1: b"\x22" * SECTOR}  # sector 0 holds a value nobody wrote
    with judge.sweep(model):
        for _ in range(2):
            verdicts = judge._judge_view(model, bad)
            assert [v.sector for v in verdicts] == [0]
    assert model.judged == 2


def test_another_model_or_the_full_path_remembers_nothing() -> None:
    good = {0: b"\x11" * SECTOR, 1: b"\x22" * SECTOR}
    judge, model, other = _judge(), _model(), _model()
    with judge.sweep(model):
        judge._judge_view(model, good)
        judge._judge_view(other, good)
        judge._judge_view(other, good)
    assert (model.judged, other.judged) == (1, 2)
    full, model = _judge(fast=False), _model()
    with full.sweep(model):
        full._judge_view(model, good)
        full._judge_view(model, good)
    assert model.judged == 2


def test_accepted_views_are_kept_per_key_and_bounded() -> None:
    from harness.judge import AcceptedViews

    views = AcceptedViews()
    snap = {0: b"\x11" * SECTOR}
    views.add("a", snap)
    assert views.holds("a", dict(snap)) and not views.holds("b", snap) and not views.holds(None, snap)
    for k in range(AcceptedViews.MAX_VIEWS):
        views.add(None, {k + 1: b"\x22" * SECTOR})
    assert not views.holds("a", snap)  # the oldest went past MAX_VIEWS
    large = dict.fromkeys(range(AcceptedViews.MAX_SECTORS + 1), bytes(SECTOR))
    views.add(None, large)
    assert not views.holds(None, large)  # too large to pin
