"""Crash images: a crash state's bytes, built from a write log's durable image and the state's kept ops."""

from __future__ import annotations

import random

from harness.crashstates.state import CrashState
from harness.faultfile import HostOp, HostOpKind, WriteLog, sector_pieces
from models.blockio import MemoryFile

def _resize(image: bytearray, size: int) -> None:
    if size < len(image):
        del image[size:]
    elif size > len(image):
        image.extend(bytes(size - len(image)))


def _garbage_bytes(seed: int, op_index: int, length: int) -> bytes:
    return random.Random(f"qcrash-garbage:{seed}:{op_index}").randbytes(length)


def _apply(image: bytearray, op: HostOp, sectors: tuple[int, ...] | None = None, garbage: int | None = None) -> None:
    """Apply one op to `image`; for a torn write, only `sectors` land (the rest keep old bytes, or garbage)."""
    if op.kind is HostOpKind.TRUNCATE:
        _resize(image, op.offset)
        return
    if op.kind is not HostOpKind.WRITE or not op.data:
        return
    start, end = op.offset, op.offset + len(op.data)
    if end > len(image):
        _resize(image, end)
    if sectors is None:
        image[start:end] = op.data
        return
    data = memoryview(op.data)
    if garbage is not None:
        data_for_dropped = memoryview(_garbage_bytes(garbage, op.index, len(op.data)))
        keep = set(sectors)
        for j, (lo, hi) in enumerate(sector_pieces(start, len(op.data))):
            image[lo:hi] = (data if j in keep else data_for_dropped)[lo - start : hi - start]
        return
    pieces = sector_pieces(start, len(op.data))
    for j in sectors:
        lo, hi = pieces[j]
        image[lo:hi] = data[lo - start : hi - start]


class CrashImageBuilder:
    """Builds crash images from a `WriteLog`, caching the durable image at the most recent flush asked for.

    A build copies the cached durable image and applies the state's kept ops: O(image
    size + kept bytes). Asking for points in increasing order only ever moves the cache
    forward (each op is applied to it once); asking for an earlier flush epoch replays
    the log from its base, which is correct but slower.
    """

    def __init__(self, log: WriteLog) -> None:
        self.log = log
        # The log's base itself until an op must be applied: a recovery's crash states
        # mostly start from it, and a copy is 20 MiB with 2 MiB clusters.
        self._durable: bytes | bytearray = log.base
        self._applied = 0  # ops[0:_applied] are applied to _durable

    def durable_image(self, point: int) -> bytes:
        """The image every crash state at `point` starts from: all ops up to the last flush before it."""
        return bytes(self._advance(point))

    def _advance(self, point: int) -> bytes | bytearray:
        self.log.check_point(point)
        target = self.log.last_flush_before(point) + 1
        if self._applied > target:
            self._durable = self.log.base
            self._applied = 0
        if target > self._applied and type(self._durable) is bytes:
            self._durable = bytearray(self._durable)
        for op in self.log.ops[self._applied : target]:
            _apply(self._durable, op)  # type: ignore[arg-type]
        self._applied = target
        return self._durable

    def build(self, state: CrashState, out: bytearray | None = None) -> bytearray:
        """The crash image of `state`; pass `out` to reuse a buffer (it is overwritten and returned).

        Raises ValueError listing every way the state does not fit the log.
        """
        problems = state.problems(self.log)
        if problems:
            raise ValueError(f"crash state {state.id!r} does not fit this log: " + "; ".join(problems))
        durable = self._advance(state.point)
        if out is None:
            image = bytearray(durable)
        else:
            out[:] = durable
            image = out
        tears = dict(state.tears)
        for index in state.kept:
            _apply(image, self.log.ops[index], tears.get(index), state.garbage)
        if state.size is not None and state.size < len(image):
            del image[state.size :]
        return image

    def build_bytes(self, state: CrashState) -> bytes:
        """The crash image of `state` as immutable bytes, the building buffer dropped at once.

        The judge keeps images as bytes; holding the buffer too while a state is judged
        doubled every crash image in memory (20 MiB each with 2 MiB clusters).
        """
        return bytes(self.build(state))

    def build_file(self, state: CrashState) -> MemoryFile:
        """The crash image as a `MemoryFile` named after the state (without a second copy of the image)."""
        f = MemoryFile(name=f"crash[{state.id}]")
        f.buf = self.build(state)
        return f
