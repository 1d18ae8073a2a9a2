"""CrashImageBuilder.build_bytes (extents over the durable image, joined once) against build (the plain buffer), on every policy's states of seeded workloads."""

from __future__ import annotations

import random

import pytest

from harness.crashstates import CrashImageBuilder, CrashState, Policy, enumerate_states
from harness.crashstates import images as imagesmod
from harness.crashstates.images import Extents, as_bytes
from harness.imagememo import digest
from tests.differential.test_check_fast_vs_full import CONFIGS, _workload


@pytest.mark.parametrize("torn_runs", [imagesmod.Extents.TORN_RUNS, 0])  # (0: every torn write laid as one buffer)
@pytest.mark.parametrize("cfg", CONFIGS[::2], ids=lambda c: f"cs{c[0]}-rc{c[1]}")
def test_build_bytes_equals_build(cfg: tuple, torn_runs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imagesmod.Extents, "TORN_RUNS", torn_runs)
    log = _workload(cfg, sum(cfg) % 613).log
    fast, plain = CrashImageBuilder(log), CrashImageBuilder(log)
    compared = large = 0
    for state in _states(log):
        image = bytes(plain.build(state))
        assert fast.build_bytes(state) == image, f"state [{state.id}]"
        # The digest hashed over the extents is the memo's digest of the joined image; a known one is not joined.
        got, key = fast.image_and_digest(state)
        assert as_bytes(got) == image and key == digest(image), f"state [{state.id}]"
        # A large image is handed out unjoined (unless its tears make too many pieces: then built whole),
        # over the log's immutable bytes only.
        if type(got) is Extents:
            assert len(image) >= imagesmod.IMAGE_EXTENTS_FROM, f"state [{state.id}]"
            large += 1
            assert digest(got) == key and got[0:len(image)] == image
            assert all(src is None or type(src) is bytes for _a, _b, src, _o in got.parts), f"state [{state.id}]"
        assert fast.image_and_digest(state, known={key}.__contains__) == (None, key)
        compared += 1
    assert compared > 50
    assert large or cfg[0] < 1 << 20  # (the 2 MiB-cluster workload's images are all large)


@pytest.mark.parametrize("cfg", CONFIGS[1::2], ids=lambda c: f"cs{c[0]}-rc{c[1]}")
def test_durable_image_as_extents_builds_the_same_images(cfg: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large image's builder keeps its durable image as extents over the log's base: same images, same durable images."""
    log = _workload(cfg, sum(cfg) % 613).log
    states = _states(log)
    plain = CrashImageBuilder(log)
    expected = [(bytes(plain.build(s)), plain.durable_image(s.point)) for s in states]
    monkeypatch.setattr(imagesmod, "DURABLE_EXTENTS_FROM", 0)
    monkeypatch.setattr(imagesmod.Extents, "MAX", 24)  # the durable extents are joined again now and then
    fast = CrashImageBuilder(log)
    for state, (image, durable) in zip(states, expected):
        assert fast.build_bytes(state) == image, f"state [{state.id}]"
        assert bytes(fast.build(state)) == image, f"state [{state.id}]"
        assert fast.durable_image(state.point) == durable, f"state [{state.id}]"
    assert type(fast._durable) is imagesmod.Extents


def _states(log) -> list[CrashState]:
    rng = random.Random(len(log))
    # Points in increasing order, then a few earlier ones (the builder replays its log from the base).
    points = sorted(rng.sample(range(len(log) + 1), min(len(log) + 1, 8)))
    points += rng.sample(points, min(3, len(points)))
    return [state for point in points for policy in Policy
            for state in enumerate_states(log, point, policy, k=3, seed=point, samples=4)]


def test_many_torn_pieces_fall_back_to_build(monkeypatch: pytest.MonkeyPatch) -> None:
    log = _workload(CONFIGS[4], 5).log
    builder = CrashImageBuilder(log)
    monkeypatch.setattr(imagesmod.Extents, "MAX", 2)
    calls = []
    real = CrashImageBuilder.build
    monkeypatch.setattr(CrashImageBuilder, "build", lambda self, s, out=None: calls.append(s) or real(self, s, out))
    states = [s for p in range(1, len(log) + 1) for s in enumerate_states(log, p, Policy.TORN, k=3, seed=1, samples=4)]
    assert states
    for state in states:
        assert builder.build_bytes(state) == bytes(CrashImageBuilder(log).build(state))
    assert calls, "no state had enough torn pieces to take the plain path"
    assert isinstance(states[0], CrashState)


def test_byte_runs_are_the_runs_of_sector_pieces() -> None:
    """`_byte_runs` (a torn write's kept runs as byte ranges, without listing its pieces) against `sector_pieces`,
    on unaligned starts and ends too."""
    from harness.faultfile import sector_pieces

    rng = random.Random(3)
    for _ in range(300):
        start, length = rng.randrange(0, 1 << 16), rng.randrange(1, 40000)
        pieces = sector_pieces(start, length)
        kept = sorted(rng.sample(range(len(pieces)), rng.randrange(1, len(pieces) + 1)))
        runs = imagesmod._runs(tuple(kept))
        assert imagesmod._byte_runs(start, start + length, runs) == \
            [(pieces[first][0], pieces[last][1]) for first, last in runs]


def test_applying_a_write_equals_zero_extending_then_overwriting() -> None:
    """images._apply writes from at most the image's end in one slice assignment: the same bytes as
    extending with zeros to the write's end and overwriting, before, at, across and past the end."""
    from harness.faultfile import HostOp, HostOpKind
    from models.blockio import WriteSite

    rng = random.Random(17)
    ends = 0
    for _ in range(3000):
        image = bytearray(rng.randbytes(rng.randrange(0, 3000)))
        offset = rng.choice((len(image), rng.randrange(0, 4000)))
        data = rng.randbytes(rng.randrange(1, 1500))
        want = bytearray(image) + bytes(max(0, offset + len(data) - len(image)))
        want[offset:offset + len(data)] = data
        imagesmod._apply(image, HostOp(0, HostOpKind.WRITE, offset, data, WriteSite.DATA, len(want)))
        assert image == want, f"write of {len(data)} bytes at {offset}"
        ends += offset == len(image) - len(data)
    assert ends > 100, "few writes ended the image: the extending case was barely compared"
