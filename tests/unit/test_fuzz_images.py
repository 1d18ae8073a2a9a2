"""The malformed-image fuzzer: deterministic cases, JSON round trip, outcome classes, shrinking."""

from __future__ import annotations

from harness.fuzz import imagecase, images, imagerun


def test_cases_are_deterministic_by_seed_and_index():
    a = [images.generate(7, i) for i in range(20)]
    b = [images.generate(7, i) for i in range(20)]
    assert a == b and [c.build() for c in a] == [c.build() for c in b]
    assert images.generate(8, 3) != images.generate(7, 3)


def test_case_json_round_trip():
    for i in range(20):
        case = images.generate(3, i)
        assert images.ImageCase.from_json(case.to_json()) == case


def test_classification_of_each_outcome():
    from models.qcow2.errors import InvalidRequest

    def named():
        raise InvalidRequest("x")

    def unexpected():
        return {}["missing"]

    def ro_write():
        imagecase.GuardFile(b"").pwrite(0, b"x")

    def memory():
        raise MemoryError()

    kw = dict(time_limit=float("inf"), hard_limit=0)
    assert imagecase.run_step("s", lambda: None, **kw).cls == "result"
    assert imagecase.run_step("s", named, **kw).cls == "named"
    assert imagecase.run_step("s", unexpected, **kw).cls == "unexpected"
    assert imagecase.run_step("s", ro_write, **kw).cls == "read-only-write"
    assert imagecase.run_step("s", memory, **kw).cls == "over-memory"
    assert imagecase.run_step("s", lambda: None, time_limit=-1.0, hard_limit=0).cls == "over-time"


def test_interval_timer_interrupts_a_runaway_step():
    def spin():
        while True:
            pass

    step = imagecase.run_step("s", spin, time_limit=float("inf"), hard_limit=0.05)
    assert step.cls == "over-time" and "interrupted" in step.detail


def test_shrink_keeps_only_what_the_failure_needs():
    case = images.generate(1, 0)
    case = images.ImageCase(0, case.base, case.patches + (images.Patch(20, b"\0\0\0\x08", "cluster_bits = 8"),))
    assert len(case.patches) >= 2

    def fails(c: images.ImageCase) -> bool:
        return any(p.what == "cluster_bits = 8" for p in c.patches)

    small = images.shrink(case, fails)
    assert [p.what for p in small.patches] == ["cluster_bits = 8"] and small.base.writes == ()


def test_a_short_run_has_no_failing_step(tmp_path):
    summary = imagerun.run(5, cases=60, qemu_every=0, cli_every=0, corpus=tmp_path, time_limit=float("inf"))
    assert summary.cases == 60 and summary.classes["result"] + summary.classes["named"] > 0
    bad = {k: v for k, v in summary.failures.items() if not k.startswith("repair wrong-result")}
    assert bad == {}
