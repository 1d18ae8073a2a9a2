"""The one generator: the op mix as a table, replayable draws, and structure-aware ranges that reach every structure edge."""

from __future__ import annotations

import random

import pytest

from harness.config import Config, draw_config
from harness.coverage import REFBLOCK, REFTABLE_GROW
from harness.generate import (DRAW_MAX, OP_MIX, Choices, _edge_example, draw_op, edge_geometry, generate, op_kind,
                              random_ops)
from harness.ops import Discard, Read, Write, WriteZeroes, validate_op
from harness.ranges import Shape, Written, fill, growth_in_reach, structured_range
from models.blockio import SECTOR

SMALL = Config(cluster_size=512, refcount_bits=16, virtual_size=1 << 20, lazy_refcounts=False)


def test_op_mix_is_a_table_walked_by_one_draw() -> None:
    assert sum(w for _, w in OP_MIX) == 100
    # A zero draw is the first row; a draw just under a row's cumulative share is still that row.
    assert op_kind(Choices([0])) == OP_MIX[0][0]
    cum = 0
    for kind, weight in OP_MIX:
        cum += weight
        top = (cum * (DRAW_MAX + 1)) // 100 - 1
        assert op_kind(Choices([top])) == kind


def test_choices_replay_and_run_out_as_zero() -> None:
    src = Choices([5, 3])
    assert src.randrange(0, 4096, 512) == 5 * 512 and src.choice("abcd") == "d" and src.randint(1, 8) == 1


def test_configs_from_draws_are_valid_and_keep_pins() -> None:
    rng = random.Random(1)
    for _ in range(500):
        cfg = draw_config(Choices([rng.randrange(DRAW_MAX + 1) for _ in range(8)]), {"cluster_size": 512})
        assert cfg.cluster_size == 512 and cfg.validate() == []


def test_every_generated_op_is_valid() -> None:
    for seed in range(400):
        config, ops = generate(seed, {}, "dev")
        for i, op in enumerate(ops):
            validate_op(op, config, f"seed {seed} op {i}")


def _ranges(config: Config, n: int = 3000, kinds=("write",)) -> list[tuple[str, int, int]]:
    rng, written, out = random.Random(3), Written(), []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        op = draw_op(kind, rng, config, written)
        out.append((kind, op.offset, op.length))
    return out


def test_ranges_reach_every_structure_edge() -> None:
    cfg = Config(cluster_size=1024, refcount_bits=16, virtual_size=1 << 20, lazy_refcounts=False)
    shape = Shape.of(cfg)
    cs, span, size = shape.cluster_size, shape.l2_span, shape.size
    got = _ranges(cfg)
    crossing = [(o, n) for _, o, n in got if o // span != (o + n - 1) // span]
    assert crossing, "no range crosses an L2-table boundary"
    assert any((o + n - 1) // span - o // span >= 2 for o, n in crossing), "no range spans several L2 tables"
    assert any(o % span == span - SECTOR for o, n in crossing), "no range starts on an L2 table's last sector"
    assert any(o + n == size and o % cs for _, o, n in got), "no range ends at the disk end from inside a cluster"
    assert any(o % cs == SECTOR for _, o, n in got), "no range starts one sector after a cluster boundary"
    assert any(o % cs == cs - SECTOR for _, o, n in got), "no range starts one sector before a cluster boundary"


def test_writes_reach_a_new_refcount_block_by_the_host_estimate() -> None:
    cfg = Config(cluster_size=1024, refcount_bits=16, virtual_size=4 << 20)
    shape, rng, written = Shape.of(cfg), random.Random(4), Written()
    blocks = {written.host_clusters(shape) // shape.refblock_span}
    for _ in range(200):
        draw_op("write", rng, cfg, written)
        blocks.add(written.host_clusters(shape) // shape.refblock_span)
    assert len(blocks) >= 3, "writes never needed a second or third refcount block"


def _events_of_write(cfg: Config, offset: int, length: int) -> set[str]:
    from harness.points import Budget
    from harness.runner import Runner

    runner = Runner(cfg, seed=1, budget=Budget(sweep=False))
    assert runner.run([Write(offset, length, 1)]) == []
    return {key.split("|")[1] for key in runner.stats.events}


@pytest.mark.parametrize("bits,size", [(64, 2 << 20), (64, 4 << 20), (32, 4 << 20)])
def test_fill_grows_the_refcount_table_in_the_model_and_no_sooner_than_needed(bits: int, size: int) -> None:
    cfg = Config(cluster_size=512, refcount_bits=bits, virtual_size=size, lazy_refcounts=False)
    shape = Shape.of(cfg)
    assert growth_in_reach(shape)
    off, n = fill(Choices([0]), shape, Written(), growth=True)
    assert REFTABLE_GROW in _events_of_write(cfg, off, n)
    # The estimate is tight: ten clusters fewer stop short of the edge (so the fill is not just "write everything").
    assert REFTABLE_GROW not in _events_of_write(cfg, off, n - 10 * 512)


def test_fill_reaches_a_new_refcount_block_in_the_model() -> None:
    cfg = Config(cluster_size=512, refcount_bits=64, virtual_size=4 << 20, lazy_refcounts=False)
    off, n = fill(Choices([0]), Shape.of(cfg), Written())
    assert n < Shape.of(cfg).reftable_span * 512 and REFBLOCK in _events_of_write(cfg, off, n)


def test_growth_is_in_reach_only_where_one_fill_gets_there() -> None:
    # 2 KiB clusters with 64-bit refcounts: the one-cluster table covers 128 MiB of host file.
    assert not growth_in_reach(Shape.of(Config(cluster_size=2048, refcount_bits=64, virtual_size=8 << 20)))
    # 512 B clusters with 16-bit refcounts: 8 MiB, more than the fill limit.
    assert not growth_in_reach(Shape.of(Config(version=2, cluster_size=512, virtual_size=8 << 20, lazy_refcounts=False)))
    assert not growth_in_reach(Shape.of(Config(cluster_size=512, refcount_bits=64, virtual_size=1 << 20)))


def test_edge_examples_move_a_share_of_nightly_configs_to_the_growth_geometry() -> None:
    edge = [s for s in range(400) if _edge_example(s, 0.08)]
    assert 10 <= len(edge) <= 60
    for seed in edge[:20]:
        config, ops = generate(seed, {}, "nightly")
        assert config.cluster_size == 512 and config.validate() == []
        if config.version == 3:
            assert growth_in_reach(Shape.of(config))
            assert any(isinstance(op, Write) and op.length >= 3900 * 512 for op in ops), "no growth fill"
    # Pinned axes still win, and dev and ci draw no edge examples.
    pinned = generate(edge[0], {"cluster_size": "65536"}, "nightly")[0]
    assert pinned == generate(edge[0], {"cluster_size": "65536"}, "dev")[0], "a pinned geometry axis keeps the draw"
    assert all(generate(s, {}, "dev")[0] == generate(s, {}, "ci")[0] for s in edge[:5])


def test_edge_geometry_keeps_v2_at_16_bit_refcounts() -> None:
    v2 = edge_geometry(Config(version=2, cluster_size=65536, virtual_size=1 << 20, lazy_refcounts=False))
    assert (v2.cluster_size, v2.refcount_bits, v2.virtual_size) == (512, 16, 2 << 20) and v2.validate() == []


def test_discards_zeroes_and_reads_aim_at_written_and_never_written_ranges() -> None:
    got = _ranges(SMALL, 4000, ("write", "discard", "write_zeroes", "read"))
    written: set[int] = set()
    hit, missed = set(), set()
    for kind, o, n in got:
        clusters = set(range(o // 512, (o + n - 1) // 512 + 1))
        if kind == "write":
            written |= clusters
        elif clusters <= written:
            hit.add(kind)
        elif not clusters & written:
            missed.add(kind)
    assert hit == missed == {"discard", "write_zeroes", "read"}


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 << 20])
def test_structured_ranges_stay_inside_every_geometry(cluster_size: int) -> None:
    cfg = Config(cluster_size=cluster_size, virtual_size=max(8 * cluster_size, 1 << 20) + 3 * SECTOR)
    shape, rng = Shape.of(cfg), random.Random(cluster_size)
    for _ in range(2000):
        o, n = structured_range(rng, shape, Written())
        validate_op(Write(o, n), cfg)


def test_random_ops_use_every_range_op() -> None:
    ops = random_ops(random.Random(2), SMALL, 400)
    assert {type(op) for op in ops} >= {Write, WriteZeroes, Discard, Read}
