"""The qemu target's capture: converted blklogwrites logs match QEMU 7.2's documented host write/flush order (qcow2-facts.md 2.2, 4.2) and replay to the real file."""

from __future__ import annotations

import pytest

from harness.config import Config
from harness.crashstates import CrashImageBuilder, Policy, enumerate_states
from harness.faultfile import HostOpKind
from harness.targets import get_target
from models.payload import make_payload
from tests.conftest import requires_qemu

pytestmark = [pytest.mark.qemu, requires_qemu]

CS = 65536


def _trace(target, since: int) -> list[str]:
    return ["F" if op.kind is HostOpKind.FLUSH else str(op.site) for op in target.log.ops[since:]]


def _three_writes(lazy: bool) -> tuple[list[list[str]], object]:
    target = get_target("qemu")
    target.create(Config(cluster_size=CS, lazy_refcounts=lazy, cache_mode="writethrough", virtual_size=64 << 20))
    traces = []
    for i in range(3):
        start = target.point()
        target.write(i * CS, make_payload(i, i * CS, CS, 7))
        traces.append(_trace(target, start))
    start = target.point()
    target.close()
    traces.append(_trace(target, start))
    return traces, target


def test_lazy_allocating_writes_match_the_documented_order() -> None:
    traces, _ = _three_writes(lazy=True)
    # First write: l2_allocate (R F, L2 F, L1 F), data, the dirty bit (sync), the writethrough L2 flush.
    assert traces[0] == ["refblock", "F", "l2-alloc", "F", "l1", "F", "data", "dirty-bit", "F", "l2", "F"]
    # Steady state with lazy refcounts: D L2 F (one flush, refblocks not written while dirty).
    assert traces[1] == traces[2] == ["data", "l2", "F"]
    # Close: refblocks written, then the whole header with the dirty bit cleared.
    assert traces[3] == ["refblock", "F", "header", "F"]


def test_eager_allocating_writes_match_the_documented_order() -> None:
    traces, _ = _three_writes(lazy=False)
    assert traces[0] == ["refblock", "F", "l2-alloc", "F", "l1", "F", "data", "refblock", "F", "l2", "F"]
    assert traces[1] == traces[2] == ["data", "refblock", "F", "l2", "F"]
    assert traces[3] == []  # nothing left to write back on close


@pytest.mark.parametrize("cache", ["writethrough", "writeback"])
def test_replaying_the_converted_log_gives_the_real_file(cache: str) -> None:
    target = get_target("qemu")
    target.create(Config(cluster_size=4096, lazy_refcounts=True, cache_mode=cache, virtual_size=4 << 20))
    target.write(0, make_payload(0, 0, 12288, 1))
    target.write_zeroes(4096, 4096)
    target.discard(8192, 4096)
    target.reopen("writethrough", False)
    target.write(1 << 20, make_payload(4, 1 << 20, 512, 1))
    target.live_repair("all")
    target.close()
    log = target.log
    prefix = enumerate_states(log, len(log), Policy.PREFIX)[0]
    assert bytes(CrashImageBuilder(log).build(prefix)) == target.contents()


def test_live_reads_return_what_was_written() -> None:
    target = get_target("qemu")
    target.create(Config(cluster_size=512, lazy_refcounts=False, cache_mode="writeback", virtual_size=1 << 20))
    data = make_payload(0, 1536, 2048, 3)
    target.write(1536, data)
    assert target.read(1536, 2048) == data
    target.write_zeroes(2048, 512)
    assert target.read(2048, 512) == bytes(512)
    target.abort()
