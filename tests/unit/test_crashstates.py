"""Tests for harness.crashstates: ids, counts, enumeration and sampling, images against a naive replay, coverage."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from harness.crashstates import (
    DEFAULT_POLICIES,
    CrashImageBuilder,
    CrashState,
    Policy,
    count_states,
    enumerate_point,
    enumerate_states,
    space_report,
    truncate_candidates,
)
from harness.faultfile import FaultInjectingFile, HostOpKind, WriteLog
from models.blockio import MemoryFile, WriteSite

# --------------------------------------------------------------------------- logs and a naive model


def fill(index: int, length: int) -> bytes:
    """Each op writes its own non-zero byte, so every byte of an image says which op wrote it."""
    return bytes([index * 37 % 255 + 1]) * length


@st.composite
def logs(draw, max_ops: int = 14, max_write: int = 1600) -> tuple[FaultInjectingFile, WriteLog]:
    base = draw(st.binary(max_size=3000))
    f = FaultInjectingFile(MemoryFile(base))
    for _ in range(draw(st.integers(0, max_ops))):
        kind = draw(st.sampled_from(["write", "write", "write", "flush", "truncate"]))
        if kind == "write":
            offset = draw(st.integers(0, 4096))
            length = draw(st.integers(0, max_write))
            f.pwrite(offset, fill(f.point(), length), draw(st.sampled_from(list(WriteSite))))
        elif kind == "flush":
            f.flush()
        else:
            f.truncate(draw(st.integers(0, 5000)))
    return f, f.log


def naive_apply(image: list[int], op, sectors=None) -> set[int]:
    """Apply one op byte by byte; return the positions a torn write did not land on."""
    dropped = set()
    if op.kind is HostOpKind.TRUNCATE:
        del image[op.offset :]
        image.extend([0] * (op.offset - len(image)))
    elif op.kind is HostOpKind.WRITE and op.data:
        end = op.offset + len(op.data)
        image.extend([0] * (end - len(image)))
        for b in range(op.offset, end):
            if sectors is None or b // 512 - op.offset // 512 in sectors:
                image[b] = op.data[b - op.offset]
            else:
                dropped.add(b)
    return dropped


def naive_durable(log: WriteLog, point: int) -> list[int]:
    flush = max((op.index for op in log.ops[:point] if op.kind is HostOpKind.FLUSH), default=-1)
    image = list(log.base)
    for op in log.ops[: flush + 1]:
        naive_apply(image, op)
    return image


def naive_image(log: WriteLog, state: CrashState) -> tuple[bytes, set[int]]:
    """Replay from the base: every op up to the last flush, then the kept ones; also the garbage positions."""
    image = naive_durable(log, state.point)
    tears = dict(state.tears)
    garbage = set()
    for index in state.kept:
        dropped = naive_apply(image, log.ops[index], tears.get(index))
        garbage = (garbage - covered(log.ops[index], tears.get(index))) | dropped
    if state.size is not None:
        del image[state.size :]
    return bytes(image), (garbage if state.garbage is not None else set())


def covered(op, sectors) -> set[int]:
    if op.kind is not HostOpKind.WRITE:
        return set()
    return {b for b in range(op.offset, op.offset + len(op.data)) if sectors is None or b // 512 - op.offset // 512 in sectors}


def same_outside(a: bytes, b: bytes, dont_care: set[int]) -> bool:
    return len(a) == len(b) and all(x == y for i, (x, y) in enumerate(zip(a, b)) if i not in dont_care)


def random_state(draw, log: WriteLog, point: int) -> CrashState:
    """Any state that fits the log at `point` (not only what a policy lists)."""
    unsynced = [op.index for op in log.unsynced(point)]
    kept = tuple(i for i in unsynced if draw(st.booleans()))
    tears = []
    for i in kept:
        op = log.ops[i]
        if op.kind is HostOpKind.WRITE and op.data and draw(st.booleans()):
            m = (op.offset + len(op.data) - 1) // 512 - op.offset // 512 + 1
            secs = draw(st.lists(st.integers(0, m - 1), min_size=1, unique=True))
            tears.append((i, tuple(sorted(secs))))
    size = draw(st.none() | st.integers(0, 6000))
    garbage = draw(st.none() | st.integers(0, 3))
    return CrashState(point, draw(st.sampled_from(list(Policy))), kept, tuple(tears), size, garbage)


# --------------------------------------------------------------------------- properties


@given(logs(), st.data())
def test_durable_state_is_contained_in_every_crash_state(fl, data):
    """Every byte of the image at the last flush reads as written, unless a kept later op changed it."""
    _, log = fl
    point = data.draw(st.integers(0, len(log)))
    policy = data.draw(st.sampled_from(list(Policy)))
    states = enumerate_states(log, point, policy, k=4, samples=6, seed=data.draw(st.integers(0, 9)))
    assume(states)
    state = data.draw(st.sampled_from(states))
    image = CrashImageBuilder(log).build(state)
    durable = naive_durable(log, point)
    tears = dict(state.tears)
    may_change: set[int] = set()
    shrunk_to = None
    for index in state.kept:
        op = log.ops[index]
        if op.kind is HostOpKind.TRUNCATE:
            shrunk_to = op.offset if shrunk_to is None else min(shrunk_to, op.offset)
        elif state.garbage is not None and index in tears:
            may_change |= covered(op, None)
        else:
            may_change |= covered(op, tears.get(index))
    for i, value in enumerate(durable):
        if i in may_change or (shrunk_to is not None and i >= shrunk_to):
            continue
        assert i < len(image), f"{state.id}: durable byte {i} lost (image is {len(image)} bytes)"
        assert image[i] == value, f"{state.id}: durable byte {i} reads {image[i]}, was {value}"


@given(logs())
def test_prefix_at_the_last_point_is_the_final_file(fl):
    f, log = fl
    (state,) = enumerate_states(log, len(log), Policy.PREFIX)
    assert CrashImageBuilder(log).build(state) == f.inner.getvalue()


@given(logs())
def test_prefix_and_drop_unsynced_at_every_point_match_the_file_as_it_was(fl):
    _, log = fl
    replay = MemoryFile(log.base)
    contents = [replay.getvalue()]
    for op in log:
        if op.kind is HostOpKind.WRITE and op.data:
            replay.pwrite(op.offset, op.data)
        elif op.kind is HostOpKind.TRUNCATE:
            replay.truncate(op.offset)
        contents.append(replay.getvalue())
    builder = CrashImageBuilder(log)
    for point in range(len(log) + 1):
        (prefix,) = enumerate_states(log, point, Policy.PREFIX)
        (drop,) = enumerate_states(log, point, Policy.DROP_UNSYNCED)
        assert builder.build(prefix) == contents[point]
        assert builder.build(drop) == contents[log.last_flush_before(point) + 1]


@given(logs(), st.data())
def test_builder_equals_a_naive_replay_in_any_order(fl, data):
    _, log = fl
    builder = CrashImageBuilder(log)  # one builder: the cache moves forward and back
    for _ in range(6):
        point = data.draw(st.integers(0, len(log)))
        if data.draw(st.booleans()):
            policy = data.draw(st.sampled_from(list(Policy)))
            states = enumerate_states(log, point, policy, k=3, samples=5)
            if not states:
                continue
            state = data.draw(st.sampled_from(states))
        else:
            state = random_state(data.draw, log, point)
        expected, dont_care = naive_image(log, state)
        image = builder.build(state)
        assert same_outside(image, expected, dont_care), state.id
        assert builder.build(state, out=bytearray(b"junk")) == image


@given(logs(max_ops=10), st.integers(0, 10))
def test_subsets_count_is_two_to_the_n_and_small_spaces_are_listed_whole(fl, k):
    _, log = fl
    for point in range(len(log) + 1):
        unsynced = [op.index for op in log.unsynced(point)]
        n = len(unsynced)
        assert count_states(log, point, Policy.SUBSETS, k=k) == 2**n
        states = enumerate_states(log, point, Policy.SUBSETS, k=k, samples=0)
        if n <= k:
            assert len(states) == 2**n
            assert {s.kept for s in states} == {
                tuple(c) for r in range(n + 1) for c in itertools.combinations(unsynced, r)
            }
        else:
            assert states == []  # samples=0 lists nothing once the space is over 2**k


@given(logs(max_ops=8, max_write=1100))
def test_every_policy_lists_exactly_its_count_when_small(fl):
    _, log = fl
    for point in range(len(log) + 1):
        for policy in Policy:
            count = count_states(log, point, policy)
            assume(count <= 2**12)
            states = enumerate_states(log, point, policy, k=12)
            assert len(states) == count == len({s.choice for s in states}), (point, policy)
            assert all(s.policy is policy and not s.problems(log) for s in states)


@given(logs(), st.integers(0, 6), st.integers(0, 12), st.integers(0, 50))
def test_enumeration_is_distinct_seeded_and_the_size_promised(fl, k, samples, seed):
    _, log = fl
    for point in range(len(log) + 1):
        for policy in Policy:
            count = count_states(log, point, policy, k=k)
            states = enumerate_states(log, point, policy, k=k, samples=samples, seed=seed)
            assert len(states) == (count if count <= max(2**k, samples) else samples)
            assert len({s.choice for s in states}) == len(states)
            assert states == enumerate_states(log, point, policy, k=k, samples=samples, seed=seed)
            assert all(not s.problems(log) for s in states)
            # States are made unchecked (CrashState.trusted): each must pass the checking constructor, field for field.
            assert all(CrashState(s.point, s.policy, s.kept, s.tears, s.size, s.garbage) == s
                       and type(s.kept) is tuple and all(type(t) is tuple and type(t[1]) is tuple for t in s.tears)
                       for s in states)
            unsynced = tuple(op.index for op in log.unsynced(point))
            if policy is Policy.SUBSETS and count > max(2**k, samples):
                assert [s.kept for s in states[:2]] == [(), unsynced][:samples]
            if policy in (Policy.TORN, Policy.GARBAGE):
                for s in states:
                    ((op_index, secs),) = s.tears
                    op = log.ops[op_index]
                    m = (op.offset + len(op.data) - 1) // 512 - op.offset // 512 + 1
                    assert s.kept == unsynced and 0 < len(secs) < m
                    assert s.garbage == (seed if policy is Policy.GARBAGE else None)
            if policy is Policy.TRUNCATE:
                candidates = truncate_candidates(log, point)
                assert all(s.kept == unsynced and s.size in candidates for s in states)
                if states and samples >= 2:
                    assert {candidates[0], candidates[-1]} <= {s.size for s in states}


def test_sampling_depends_on_the_seed():
    f = FaultInjectingFile(MemoryFile())
    for i in range(20):
        f.pwrite(i * 512, fill(i, 512))
    lists = {tuple(s.id for s in enumerate_states(f.log, 20, Policy.SUBSETS, seed=seed, samples=10)) for seed in range(5)}
    assert len(lists) == 5


@st.composite
def crash_states(draw) -> CrashState:
    point = draw(st.integers(0, 300))
    kept = tuple(sorted(draw(st.sets(st.integers(0, max(point - 1, 0)), max_size=12)))) if point else ()
    torn = sorted(draw(st.sets(st.sampled_from(kept), max_size=3))) if kept else []
    tears = tuple((op, tuple(sorted(draw(st.sets(st.integers(0, 200), min_size=1, max_size=10))))) for op in torn)
    return CrashState(
        point,
        draw(st.sampled_from(list(Policy))),
        kept,
        tears,
        draw(st.none() | st.integers(0, 2**40)),
        draw(st.none() | st.integers(0, 2**31)),
    )


@given(crash_states())
def test_ids_round_trip(state):
    assert CrashState.parse(state.id) == state
    assert CrashState.parse(state.id).id == state.id
    assert str(state) == state.id and "  " not in state.id


@given(crash_states(), st.data())
def test_mangled_ids_either_round_trip_or_raise_a_value_error_naming_the_id(state, data):
    text = state.id
    position = data.draw(st.integers(0, len(text)))
    edit = data.draw(st.sampled_from(["insert", "delete", "replace"]))
    char = data.draw(st.sampled_from(list("p=0123456789-,: abkeptorn")))
    if edit == "insert":
        text = text[:position] + char + text[position:]
    elif edit == "delete":
        text = text[:position] + text[position + 1 :]
    else:
        text = text[:position] + char + text[position + 1 :]
    try:
        parsed = CrashState.parse(text)
    except ValueError as e:
        assert str(e).startswith(f"crash state id {text!r}: field ")
    else:
        assert parsed.id == text


@given(st.text(max_size=40))
def test_arbitrary_text_parses_only_to_its_own_id(text):
    try:
        parsed = CrashState.parse(text)
    except ValueError as e:
        assert repr(text) in str(e)
    else:
        assert parsed.id == text


@pytest.mark.parametrize(
    "text, field, rule",
    [
        ("p=3 subsets keep=1-5", "state", "below the point 3"),
        ("p=3 subsets keep=none size=", "size", "not a canonical"),
        ("p=3 subsets keep=0 tear=0:0,0", "tear", "ascend without repeats"),
        ("p=3 subsets keep=0 tear=0:", "tear", "not a canonical"),
        ("p=3 subsets keep=0 garbage=1 size=2", "size", "out of order"),
        ("p=3 subsets keep=0 tear=0:1 tear=0:2", "state", "distinct op indices"),
        ("x=3 subsets keep=0", "p", "expected p=..."),
        ("p=3 subsets kept=0", "keep", "expected keep=..."),
    ],
)
def test_parse_errors_name_the_id_field_and_rule(text, field, rule):
    with pytest.raises(ValueError, match=rf"^crash state id '{text}': field '{field}': .*{rule}"):
        CrashState.parse(text)


def test_state_fields_are_checked_and_sequences_become_tuples():
    s = CrashState(5, "torn", [1, 2], [(2, [0, 3])])
    assert s.kept == (1, 2) and s.tears == ((2, (0, 3)),) and s.policy is Policy.TORN
    assert hash(s) == hash(CrashState.parse(s.id))
    with pytest.raises(ValueError, match="kept .* must be distinct ascending"):
        CrashState(5, Policy.SUBSETS, (2, 1))
    with pytest.raises(ValueError, match="policy 'sometimes' is unknown"):
        CrashState(5, "sometimes")
    with pytest.raises(ValueError, match="size -1 must be None or a non-negative int"):
        CrashState(5, Policy.TRUNCATE, (), (), -1)


# --------------------------------------------------------------------------- exact counts


def test_counts_are_exact_for_huge_spaces():
    f = FaultInjectingFile(MemoryFile())
    f.flush()
    for i in range(40):
        f.pwrite(i * 512, fill(i, 512), WriteSite.DATA)
    f.pwrite(1 << 20, fill(40, 65536), WriteSite.L2)  # 128 sectors
    f.pwrite(256, fill(41, 1024))  # 3 pieces: 6 tears
    point = len(f.log)
    assert count_states(f.log, point, Policy.SUBSETS) == 2**42
    assert count_states(f.log, point, Policy.TORN) == (2**128 - 2) + (2**3 - 2)
    assert count_states(f.log, point, Policy.GARBAGE) == count_states(f.log, point, Policy.TORN)
    assert count_states(f.log, point, Policy.DROP_UNSYNCED) == count_states(f.log, point, Policy.PREFIX) == 1
    assert count_states(f.log, point, Policy.SUBSETS, k=0) == 2**42  # k bounds listing, not the space
    for policy in (Policy.SUBSETS, Policy.TORN, Policy.GARBAGE):
        states = enumerate_states(f.log, point, policy, samples=64)
        assert len(states) == 64 == len({s.choice for s in states})


def test_truncate_candidates_follow_the_definition():
    f = FaultInjectingFile(MemoryFile(bytes(1000)))
    f.flush()
    f.pwrite(1000, fill(1, 3000))  # op 1 grows 1000 -> 4000: adds 4000 and its last boundary 3584
    f.truncate(2000)  # op 2 adds 2000
    f.truncate(600)  # op 3 adds 600: below the flushed size, so the floor drops to 600
    f.pwrite(0, fill(4, 1500))  # op 4 grows 600 -> 1500: adds 1500 and 1024
    f.pwrite(5000, fill(5, 10))  # op 5 grows 1500 -> 5010: adds 5010 and 4608
    assert truncate_candidates(f.log, 1) == []
    assert truncate_candidates(f.log, 2) == [1000, 3584]
    assert truncate_candidates(f.log, 3) == [1000]
    assert truncate_candidates(f.log, 4) == []
    assert truncate_candidates(f.log, 5) == [600, 1000, 1024]
    assert truncate_candidates(f.log, 6) == [600, 1000, 1024, 1500, 2000, 3584, 4000, 4608]
    assert count_states(f.log, 6, Policy.TRUNCATE) == 8


def test_bad_arguments_are_rejected():
    log = FaultInjectingFile(MemoryFile()).log
    with pytest.raises(ValueError, match="policy 'all' is unknown"):
        count_states(log, 0, "all")
    with pytest.raises(ValueError, match="k=-1: must be a non-negative int"):
        enumerate_states(log, 0, Policy.SUBSETS, k=-1)
    with pytest.raises(ValueError, match="crash point 1 is out of range"):
        enumerate_states(log, 1, Policy.SUBSETS)


# --------------------------------------------------------------------------- builder


def test_builder_rejects_states_that_do_not_fit_and_lists_every_problem():
    f = FaultInjectingFile(MemoryFile())
    f.pwrite(0, b"a" * 1024)
    f.flush()
    f.truncate(100)
    state = CrashState(3, Policy.TORN, (0, 2), ((2, (0,)),))
    with pytest.raises(ValueError, match=r"kept op 0 is not in the unsynced epoch.*; torn op 2 is a truncate"):
        CrashImageBuilder(f.log).build(state)


def test_builder_follows_a_growing_log_and_reuses_buffers():
    f = FaultInjectingFile(MemoryFile())
    builder = CrashImageBuilder(f.log)
    f.pwrite(0, b"a" * 600)
    f.flush()
    assert builder.build(CrashState(2, Policy.PREFIX)) == b"a" * 600
    f.pwrite(1000, b"b" * 24)
    buf = bytearray(b"old contents")
    image = builder.build(CrashState(3, Policy.PREFIX, (2,)), out=buf)
    assert image is buf and image == b"a" * 600 + bytes(400) + b"b" * 24
    assert builder.durable_image(3) == b"a" * 600
    mf = builder.build_file(CrashState(3, Policy.TRUNCATE, (2,), size=700))
    assert mf.getvalue() == b"a" * 600 + bytes(100) and mf.name == "crash[p=3 truncate keep=2 size=700]"


def test_garbage_is_seeded():
    f = FaultInjectingFile(MemoryFile(bytes(2048)))
    f.pwrite(0, b"a" * 2048)
    builder = CrashImageBuilder(f.log)
    one = builder.build(CrashState(1, Policy.GARBAGE, (0,), ((0, (0,)),), garbage=1))
    assert one == builder.build(CrashState.parse("p=1 garbage keep=0 tear=0:0 garbage=1"))
    two = builder.build(CrashState(1, Policy.GARBAGE, (0,), ((0, (0,)),), garbage=2))
    assert one[:512] == two[:512] == b"a" * 512 and one[512:] != two[512:]
    assert one[512:].count(0) < 100  # garbage, not the old zeros


# --------------------------------------------------------------------------- cross-policy dedup and coverage


@given(logs(max_ops=10), st.integers(0, 5), st.integers(0, 6))
def test_space_report_matches_the_enumerations(fl, k, samples):
    _, log = fl
    policies = list(Policy)
    report = space_report(log, policies, k, samples=samples)
    assert report.points == len(log) + 1
    for row in report.rows:
        assert row.total == sum(count_states(log, p, row.policy) for p in range(len(log) + 1))
        assert row.enumerated == sum(
            len(enumerate_states(log, p, row.policy, k=k, samples=samples)) for p in range(len(log) + 1)
        )
    listed = [enumerate_point(log, p, policies, k=k, samples=samples) for p in range(len(log) + 1)]
    assert report.distinct_enumerated == sum(map(len, listed))
    for states in listed:
        assert len({s.choice for s in states}) == len(states)


@given(logs(max_ops=7, max_write=1100), st.sampled_from([DEFAULT_POLICIES, tuple(Policy), (Policy.DROP_UNSYNCED, Policy.PREFIX)]))
def test_distinct_total_counts_each_choice_once(fl, policies):
    _, log = fl
    report = space_report(log, policies, 14, samples=0)
    assume(all(row.total == row.enumerated for row in report.rows))  # exhaustive: lists are the spaces
    union = sum(len({s.choice for s in enumerate_point(log, p, policies, k=14)}) for p in range(len(log) + 1))
    assert report.distinct_total == union == report.distinct_enumerated


def test_enumerate_point_keeps_the_first_policy_that_lists_a_choice():
    f = FaultInjectingFile(MemoryFile())
    f.pwrite(0, b"a" * 1024)
    states = enumerate_point(f.log, 1)
    assert [s.id for s in states] == [
        "p=1 drop-unsynced keep=none",
        "p=1 prefix keep=0",
        "p=1 torn keep=0 tear=0:0",
        "p=1 torn keep=0 tear=0:1",
        "p=1 truncate keep=0 size=0",
        "p=1 truncate keep=0 size=512",
    ]


def test_space_report_formats_and_serialises():
    f = FaultInjectingFile(MemoryFile())
    for i in range(12):
        f.pwrite(i * 512, fill(i, 1024))
    report = space_report(f.log, DEFAULT_POLICIES, 3, samples=4)
    subsets = report.rows[2]
    assert subsets.policy is Policy.SUBSETS and subsets.total == 2**13 - 1
    assert report.as_dict()["policies"]["subsets"]["states"] == 2**13 - 1
    text = report.format()
    assert text.splitlines()[0] == "crash space over 13 points (k=3, samples=4)"
    assert "distinct" in text.splitlines()[-1]


def test_benchmark_writes_its_report(tmp_path):
    import json

    from harness.bench.crashstates import run

    result = run(tmp_path, image_mib=1, writes=40, samples=2)
    written = json.loads((tmp_path / "bench_crashstates.json").read_text())
    assert written["states_built"] == result["states_built"] == sum(written["states_by_policy"].values())
    assert written["workload"]["points"] == written["coverage"]["points"] == written["workload"]["ops"] + 1
    assert written["states_by_policy"]["prefix"] == written["workload"]["points"]
    assert written["peak_rss_bytes"] > 0 and written["peak_traced_bytes"] > 0
