"""Crash images: a crash state's bytes, built from a write log's durable image and the state's kept ops."""

from __future__ import annotations

import bisect
import random
import weakref

import xxhash

from harness.crashstates.state import CrashState
from harness.faultfile import HostOp, HostOpKind, WriteLog, sector_pieces
from models.blockio import SECTOR, MemoryFile

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
    if sectors is None:
        # (a write from at most the end replaces what it covers and extends the rest in one step: an
        # image grown a cluster at a time was first zero-extended, then overwritten)
        if start > len(image):
            _resize(image, start)
        image[start:end] = op.data
        return
    if end > len(image):
        _resize(image, end)
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


# From this image size a builder keeps its durable image as extents over the log's base
# (harness/targets/python.py's CopyOnWriteFile does the same for a recovery's writes).
DURABLE_EXTENTS_FROM = 4 << 20


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
        # mostly start from it, and a copy is 20 MiB with 2 MiB clusters. (A base that is
        # itself `Extents`, a recovery of a large image, is copied before anything is laid
        # over it: the log's base never changes.)
        self._durable: bytes | bytearray | Extents = log.base
        self._applied = 0  # ops[0:_applied] are applied to _durable
        self._chunks = ChunkDigests.for_base(log.base, log)  # shared by every image laid over the base

    def durable_image(self, point: int) -> bytes:
        """The image every crash state at `point` starts from: all ops up to the last flush before it."""
        durable = self._advance(point)
        return durable.join() if type(durable) is Extents else bytes(durable)

    def _advance(self, point: int) -> bytes | bytearray | Extents:
        """The durable image at `point`: a buffer, or for a large image (`DURABLE_EXTENTS_FROM`) extents
        over the log's base, so that a builder never holds a whole second copy of a 20 MiB image."""
        self.log.check_point(point)
        target = self.log.last_flush_before(point) + 1
        if self._applied > target:
            self._durable = self.log.base
            self._applied = 0
        if target > self._applied and self._durable is self.log.base:
            base = self.log.base
            size = max(len(base), self.log.ops[target - 1].size_after)
            if type(base) is Extents:
                self._durable = base.copy()
            else:
                self._durable = Extents(base, self._chunks) if size >= DURABLE_EXTENTS_FROM else bytearray(base)
        durable = self._durable
        for op in self.log.ops[self._applied : target]:
            if type(durable) is Extents:
                durable.apply(op, None, None)
                if len(durable.parts) > Extents.MAX // 2:  # (room left for the kept ops of a state)
                    durable = self._durable = Extents(durable.join())
            else:
                _apply(durable, op)  # type: ignore[arg-type]
        self._applied = target
        return durable

    def build(self, state: CrashState, out: bytearray | None = None) -> bytearray:
        """The crash image of `state`; pass `out` to reuse a buffer (it is overwritten and returned).

        Raises ValueError listing every way the state does not fit the log.
        """
        problems = state.problems(self.log)
        if problems:
            raise ValueError(f"crash state {state.id!r} does not fit this log: " + "; ".join(problems))
        durable = self._advance(state.point)
        if type(durable) is Extents:
            durable = durable.join()
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

    def extents(self, state: CrashState) -> "Extents | None":
        """The crash image of `state` as extents, not yet joined (None when its ops tear into too many pieces).

        What the runner's dedup and the judge's memo need first is the image's digest
        (`Extents.digest`): a sweep builds the same image for many neighbouring states, and
        an image seen before is never joined.
        """
        problems = state.problems(self.log)
        if problems:
            raise ValueError(f"crash state {state.id!r} does not fit this log: " + "; ".join(problems))
        durable = self._advance(state.point)
        extents = durable.copy() if type(durable) is Extents else Extents(durable, self._chunks)
        tears = dict(state.tears)
        for index in state.kept:
            if not extents.apply(self.log.ops[index], tears.get(index), state.garbage):
                return None
        if state.size is not None:
            extents.cut(state.size)
        return extents

    def image_and_digest(self, state: CrashState, known=lambda _key: False) -> tuple[Image | None, bytes]:
        """The crash image of `state` and its digest (XXH3-128, as harness.imagememo.digest); the image is None when
        `known(digest)` says the caller has it already, and then it was never joined.

        A large image (`IMAGE_EXTENTS_FROM`) whose extents lie over immutable bytes only (the
        log's base and ops, not the builder's own buffer) is handed out as those `Extents`,
        never joined: judging reads it where it lies (an image `Image`).
        """
        extents = self.extents(state)
        if extents is None:
            image = bytes(self.build(state))
            key = digest_bytes(image)
            return (None if known(key) else image), key
        key = extents.digest()
        if known(key):
            return None, key
        if extents.size >= IMAGE_EXTENTS_FROM and type(self._durable) is not bytearray:
            return extents, key
        return extents.join(), key

    def build_bytes(self, state: CrashState) -> bytes:
        """The crash image of `state` as immutable bytes (what `build` makes), copied once.

        `build` copies the durable image into a buffer, grows it (another copy when the
        crash state's file is larger) and the judge then needed it as bytes (a third): with
        1 MiB clusters that was a fifth of an example. Here the kept ops are laid over the
        durable image as extents and the image is joined once (`Extents`); a state whose
        ops tear into many pieces goes through `build`.
        """
        extents = self.extents(state)
        return bytes(self.build(state)) if extents is None else extents.join()

    def build_file(self, state: CrashState) -> MemoryFile:
        """The crash image as a `MemoryFile` named after the state (without a second copy of the image)."""
        f = MemoryFile(name=f"crash[{state.id}]")
        f.buf = self.build(state)
        return f


# From this size a crash image is judged as `Extents` over the log's bytes, never joined
# (a 2 MiB-cluster image is tens of MiB: joining each new one was a quarter of an example,
# and the judge's memo held a whole copy of each).
IMAGE_EXTENTS_FROM = 4 << 20


_SMALL_EXTENT = 4096  # extents up to this size are hashed joined (`Extents.hash_range`)
_ZEROS = memoryview(bytes(1 << 20))  # fed to the digest for zero extents, a MiB at a time

# Images larger than this are digested by chunks (`digest_bytes`): the digest of the chunks'
# digests. A sweep's crash images with 2 MiB clusters are tens of MiB, nearly all of it the
# log's base where it lay, and hashing each whole image was 6.7% of dev 12 at 2 MiB (py-spy);
# chunked, each chunk of the base is hashed once per log (`ChunkDigests`) and a crash image
# rehashes only the chunks its kept ops touch. Smaller images keep the plain XXH3-128.
CHUNKED_ABOVE = 4 << 20
CHUNK = 256 << 10


def digest_bytes(data) -> bytes:
    """The image digest of a buffer: XXH3-128 up to `CHUNKED_ABOVE` bytes, else XXH3-128 over its
    `CHUNK`s' XXH3-128 digests and its size (what `Extents.digest` computes where the bytes lie)."""
    size = len(data)
    if size <= CHUNKED_ABOVE:
        return xxhash.xxh3_128_digest(data)
    with memoryview(data) as view:
        return _combine([xxhash.xxh3_128_digest(view[c:c + CHUNK]) for c in range(0, size, CHUNK)], size)


def _combine(chunk_digests: list[bytes], size: int) -> bytes:
    return xxhash.xxh3_128_digest(b"".join(chunk_digests) + size.to_bytes(8, "little"))


class ChunkDigests:
    """The digests of chunks of immutable buffers, computed once each and shared by every image laid over them.

    Two kinds: a chunk that an image takes whole from the base at the same offset, and a
    chunk that it takes whole from one of the log's written buffers (`of_source`: a 2 MiB
    cluster write lies in every crash image that keeps it). Hazards: the base must never
    change (bytes, not a bytearray: `for_base` gives None otherwise); a written buffer is
    known by `id` only while the log holds it, so the log is held weakly and each use checks
    that the log's op still holds that very buffer (an id can be reused once its object is
    gone).
    """

    __slots__ = ("base", "digests", "_log", "_ids", "_indexed", "_written")

    def __init__(self, base: bytes, log=None) -> None:
        self.base = base
        self.digests: dict[int, bytes] = {}  # chunk start -> digest of base[start:start + CHUNK]
        self._log = weakref.ref(log) if log is not None else None
        self._ids: dict[int, int] = {}  # id of a written buffer of CHUNK bytes or more -> its op's index
        self._indexed = 0  # the log's ops looked at so far
        self._written: dict[tuple[int, int, int], bytes] = {}  # (op index, offset, length) -> digest

    @classmethod
    def for_base(cls, base, log=None) -> "ChunkDigests | None":
        return cls(base, log) if type(base) is bytes and len(base) > CHUNKED_ABOVE else None

    def of(self, start: int) -> bytes:
        d = self.digests.get(start)
        if d is None:
            with memoryview(self.base) as view:
                d = self.digests[start] = xxhash.xxh3_128_digest(view[start:start + CHUNK])
        return d

    def of_source(self, src, offset: int, length: int) -> bytes | None:
        """The digest of src[offset:offset + length] when `src` is a buffer the log wrote; else None."""
        log = self._log() if self._log is not None else None
        if log is None:
            return None
        k = self._ids.get(id(src))
        if k is None and self._indexed < len(log.ops):
            for op in log.ops[self._indexed:]:
                if len(op.data) >= CHUNK:
                    self._ids[id(op.data)] = op.index
            self._indexed = len(log.ops)
            k = self._ids.get(id(src))
        if k is None or log.ops[k].data is not src:
            return None
        key = (k, offset, length)
        d = self._written.get(key)
        if d is None:
            with memoryview(src) as view:
                d = self._written[key] = xxhash.xxh3_128_digest(view[offset:offset + length])
        return d


class Extents:
    """An image as ascending, disjoint extents [start, end) over source buffers (None: zeros), joined once.

    For `build_bytes` and for replaying a recovery's writes (harness/targets/readmemo.py),
    and, for a large image, the image itself while it is judged (`Image`). Hazard: an
    Extents handed on as an image must lie over immutable sources only (bytes, never a
    buffer that changes later), and nobody lays anything over it: whoever changes an
    image's bytes works on a `copy`.
    """

    MAX = 256  # extents past which a state is built the plain way (many torn pieces)
    TORN_RUNS = 8  # kept runs of a torn write from which its range is laid as one buffer (`_torn`)

    def __init__(self, base, chunks: ChunkDigests | None = None) -> None:
        self.size = len(base)
        self.parts: list[tuple[int, int, object, int]] = [(0, self.size, base, 0)] if self.size else []
        # Each part's end, in step with `parts`: searched in C (a bisect with a key function called
        # back into Python a dozen times per write of a recovery replayed over thousands of parts).
        self.ends: list[int] = [self.size] if self.size else []
        # Chunk digests of an immutable base, shared with every copy (`digest`); pass the same
        # object for every Extents over one base, so that each chunk is hashed once.
        self.chunks = chunks if chunks is not None and chunks.base is base else ChunkDigests.for_base(base)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: slice) -> bytes:
        """A slice of the image as bytes (clipped to the image, as a slice of bytes is); only plain slices."""
        if type(index) is not slice or index.step not in (None, 1):
            raise TypeError(f"Extents take plain slices, not {index!r}")
        start, stop, _ = index.indices(self.size)
        return self.read(start, stop - start) if stop > start else b""

    def copy(self) -> "Extents":
        """Another image over the same source buffers (the parts are immutable tuples)."""
        other = Extents(b"")
        other.size, other.parts, other.ends = self.size, list(self.parts), list(self.ends)
        other.chunks = self.chunks
        return other

    def apply(self, op: HostOp, sectors: tuple[int, ...] | None, garbage: int | None) -> bool:
        """Lay one op over the image as `_apply` would; False when it would make too many extents."""
        if op.kind is HostOpKind.TRUNCATE:
            self.cut(op.offset)
            self.grow(op.offset)
            return True
        if op.kind is not HostOpKind.WRITE or not op.data:
            return True
        start, end = op.offset, op.offset + len(op.data)
        self.grow(end)
        if sectors is None:
            self.put(start, end, op.data, 0)
        else:
            runs = _byte_runs(start, end, _runs(sectors))
            if len(runs) > self.TORN_RUNS:
                self.put(start, end, self._torn(op, runs, garbage), 0)
                return len(self.parts) <= self.MAX
            if garbage is not None:
                self.put(start, end, _garbage_bytes(garbage, op.index, len(op.data)), 0)
            for lo, hi in runs:
                self.put(lo, hi, op.data, lo - start)
                if len(self.parts) > self.MAX:
                    return False
        return len(self.parts) <= self.MAX

    def _torn(self, op: HostOp, runs: list[tuple[int, int]], garbage: int | None) -> bytes:
        """The bytes a torn write leaves over its range: its kept runs over the old bytes (or garbage), as one
        buffer. (A 2 MiB write torn at random keeps about 2,000 runs of sectors: as extents it overflowed
        `MAX` and the whole image was built as a buffer instead, a tenth of a 2 MiB-cluster example.)"""
        start = op.offset
        out = bytearray(_garbage_bytes(garbage, op.index, len(op.data)) if garbage is not None
                        else self.read(start, len(op.data)))
        data = memoryview(op.data)
        for lo, hi in runs:
            out[lo - start:hi - start] = data[lo - start:hi - start]
        return bytes(out)

    def grow(self, size: int) -> None:
        if size > self.size:
            self.parts.append((self.size, size, None, 0))
            self.ends.append(size)
            self.size = size

    def cut(self, size: int) -> None:
        if size >= self.size:
            return
        kept = [p for p in self.parts if p[0] < size]
        if kept and kept[-1][1] > size:
            a, _b, src, off = kept[-1]
            kept[-1] = (a, size, src, off)
        self.parts, self.ends, self.size = kept, [p[1] for p in kept], size

    def put(self, lo: int, hi: int, src, off: int) -> None:
        """Bytes [lo, hi) (inside the image) come from src[off:]: the extents they cover are cut around them."""
        parts = self.parts
        i = bisect.bisect_right(self.ends, lo)  # the first extent ending after lo
        j = i + 1
        while j < len(parts) and parts[j][0] < hi:
            j += 1
        new = []
        a, _b, s, o = parts[i]
        if a < lo:
            new.append((a, lo, s, o))
        new.append((lo, hi, src, off))
        a, b, s, o = parts[j - 1]
        if b > hi:
            new.append((hi, b, s, o + hi - a))
        parts[i:j] = new
        self.ends[i:j] = [p[1] for p in new]

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) clipped to the image (a file's pread): one slice when one extent holds them."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        parts = self.parts
        i = bisect.bisect_right(self.ends, offset)
        a, b, src, off = parts[i]
        if end <= b:
            return bytes(end - offset) if src is None else bytes(src[off + offset - a:off + end - a])
        chunks = []
        while i < len(parts) and parts[i][0] < end:
            a, b, src, off = parts[i]
            lo, hi = max(a, offset), min(b, end)
            chunks.append(bytes(hi - lo) if src is None else src[off + lo - a:off + hi - a])
            i += 1
        return b"".join(chunks)

    def hash_range(self, h, offset: int, length: int) -> None:
        """Feed bytes [offset, offset + length), clipped to the image, to the hash `h` where they lie (no copy:
        `read` would copy every range a memoised check read, a table of 2 MiB at a time)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return
        parts = self.parts
        i = bisect.bisect_right(self.ends, offset)
        # Small extents (a 512-byte-cluster image is hundreds of sector-sized writes over its
        # base) are copied into one buffer and hashed in one call: a call per extent cost more
        # than the hashing. The hash streams, so the digest is the same.
        small: list[bytes] = []
        while i < len(parts) and parts[i][0] < end:
            a, b, src, off = parts[i]
            lo, hi = max(a, offset), min(b, end)
            if hi - lo <= _SMALL_EXTENT:
                small.append(bytes(hi - lo) if src is None else src[off + lo - a:off + hi - a])
            else:
                if small:
                    h.update(b"".join(small))
                    small = []
                if src is None:
                    for z in range(lo, hi, len(_ZEROS)):
                        h.update(_ZEROS[:min(hi - z, len(_ZEROS))])
                else:
                    with memoryview(src) as view:
                        h.update(view[off + lo - a:off + hi - a])
            i += 1
        if small:
            h.update(b"".join(small))

    def digest(self) -> bytes:
        """`digest_bytes` of the image's bytes (what `join` would return), hashed where they lie, without joining them."""
        size = self.size
        if size <= CHUNKED_ABOVE:
            h = xxhash.xxh3_128()
            self.hash_range(h, 0, size)
            return h.digest()
        chunks = self.chunks
        base = chunks.base if chunks is not None else None
        parts, ends = self.parts, self.ends
        out = []
        for c in range(0, size, CHUNK):
            e = min(c + CHUNK, size)
            a, b, src, off = parts[bisect.bisect_right(ends, c)]
            # the base's own chunk, whole (and the image's chunk as long as the base's: an image cut
            # short, or grown past its base, ends a chunk where the base does not)
            # (base None is no base: a zero part's src is None too)
            if base is not None and src is base and b >= e and off == a and min(c + CHUNK, len(base)) == e:
                out.append(chunks.of(c))
            elif b >= e and chunks is not None and type(src) is bytes and \
                    (d := chunks.of_source(src, off + c - a, e - c)) is not None:
                out.append(d)  # (the chunk lies whole in one of the log's written buffers)
            else:
                h = xxhash.xxh3_128()
                self.hash_range(h, c, e - c)
                out.append(h.digest())
        return _combine(out, size)

    def join(self) -> bytes:
        """The image's bytes, in one copy. (The views into the builder's own buffer are released at
        once: a live view would stop that buffer from growing when the builder moves on.)"""
        chunks: list = []
        try:
            for a, b, src, off in self.parts:
                chunks.append(bytes(b - a) if src is None else memoryview(src)[off:off + b - a])
            return b"".join(chunks)
        finally:
            for chunk in chunks:
                if type(chunk) is memoryview:
                    chunk.release()


Image = bytes | Extents  # a crash or recovered image while it is judged (large ones as extents)


def as_bytes(image: "bytes | bytearray | Extents") -> bytes:
    """An image's bytes, joined when it is `Extents` (for whatever needs one buffer: a file, qemu-img)."""
    return image.join() if type(image) is Extents else bytes(image)


def _byte_runs(start: int, end: int, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs of pieces of the write [start, end) (as `sector_pieces` numbers them) as absolute byte ranges,
    without listing every piece (a 2 MiB write has 4,096)."""
    first_sector = start // SECTOR
    return [(start if first == 0 else (first_sector + first) * SECTOR, min(end, (first_sector + last + 1) * SECTOR))
            for first, last in runs]


def _runs(sectors: tuple[int, ...]) -> list[tuple[int, int]]:
    """Ascending sector indices as (first, last) runs of consecutive ones."""
    out: list[list[int]] = []
    for j in sectors:
        if out and out[-1][1] + 1 == j:
            out[-1][1] = j
        else:
            out.append([j, j])
    return [(a, b) for a, b in out]
