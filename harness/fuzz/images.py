"""Seeded malformed images: a valid base image from a small recipe, then byte patches aimed at every structure.

A case is data: `ImageCase(base=BaseRecipe, patches=[Patch], truncate=...)`. The same seed
always gives the same case (one `random.Random(f"{seed}:{index}")` per case), and a case
rebuilds its bytes without randomness, so a shrunk case is a small JSON file.

Mutations aim at every structure, by what it means rather than by byte position:
header fields (boundary values, 2^63 and beyond, offsets of other structures), header
extensions, L1 / L2 / refcount-table / refcount-block entries (pointing at themselves, at
each other, past EOF, past 2^56 and 2^63, unaligned, reserved bits, maximal counts),
truncation and growth of the file, and raw byte flips.
"""

from __future__ import annotations

import dataclasses
import random
import struct

from models.blockio import MemoryFile
from models.qcow2.image import Qcow2Image
from models.qcow2.structs import HEADER_FIELDS

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class BaseRecipe:
    """A valid image: create options, then guest writes of a pattern byte, then close (or abort: dirty)."""

    version: int = 3
    cluster_size: int = 65536
    refcount_bits: int = 16
    lazy: bool = False
    size: int = 4 * MiB
    writes: tuple[tuple[int, int, int], ...] = ()  # (offset, length, pattern byte)
    abort: bool = False

    def build(self) -> bytes:
        mem = MemoryFile(name="base.qcow2")
        Qcow2Image.create(mem, self.size, version=self.version, cluster_size=self.cluster_size,
                          refcount_bits=self.refcount_bits, lazy_refcounts=self.lazy)
        img = Qcow2Image.open(mem)
        for off, length, pattern in self.writes:
            img.write(off, bytes([pattern]) * length)
        if self.abort:
            img.flush()
            img.abort()
        else:
            img.close()
        return mem.getvalue()


@dataclasses.dataclass(frozen=True)
class Patch:
    """Write `data` at `offset` (the file grows with zeros if needed); `what` says which structure it aims at."""

    offset: int
    data: bytes
    what: str


@dataclasses.dataclass(frozen=True)
class ImageCase:
    index: int
    base: BaseRecipe
    patches: tuple[Patch, ...] = ()
    truncate: int | None = None  # final file length, after the patches

    def build(self, base_bytes: bytes | None = None) -> bytes:
        buf = bytearray(self.base.build() if base_bytes is None else base_bytes)
        for p in self.patches:
            if p.offset + len(p.data) > len(buf):
                buf.extend(bytes(p.offset + len(p.data) - len(buf)))
            buf[p.offset : p.offset + len(p.data)] = p.data
        if self.truncate is not None:
            del buf[self.truncate :]
        return bytes(buf)

    def describe(self) -> str:
        parts = [p.what for p in self.patches]
        if self.truncate is not None:
            parts.append(f"truncate to {self.truncate:#x}")
        return "; ".join(parts) or "unmutated"

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "base": {**dataclasses.asdict(self.base), "writes": [list(w) for w in self.base.writes]},
            "patches": [{"offset": p.offset, "data": p.data.hex(), "what": p.what} for p in self.patches],
            "truncate": self.truncate,
        }

    @classmethod
    def from_json(cls, obj: dict) -> "ImageCase":
        base = dict(obj["base"])
        base["writes"] = tuple(tuple(w) for w in base["writes"])
        patches = tuple(Patch(p["offset"], bytes.fromhex(p["data"]), p["what"]) for p in obj["patches"])
        return cls(obj["index"], BaseRecipe(**base), patches, obj.get("truncate"))


# ------------------------------------------------------------------------------ generation
def _base(rng: random.Random) -> BaseRecipe:
    version = rng.choice((2, 3, 3, 3))
    cs = rng.choice((512, 512, 4096, 65536))
    order = 4 if version == 2 else rng.choice((0, 3, 4, 4, 4, 5, 6))
    size = rng.choice((1, 2, 4)) * MiB
    writes = []
    for _ in range(rng.randrange(0, 5)):
        off = rng.randrange(0, size // 512) * 512
        writes.append((off, min(size - off, rng.choice((512, cs, 2 * cs))), rng.randrange(1, 256)))
    lazy = version == 3 and rng.random() < 0.5
    return BaseRecipe(version, cs, 1 << order, lazy, size, tuple(writes), abort=lazy and bool(writes) and rng.random() < 0.5)


@dataclasses.dataclass
class Layout:
    """Where the base image keeps its structures (read back from its bytes)."""

    cs: int
    size: int
    l1_off: int
    l1_size: int
    rt_off: int
    rt_len: int
    l2_offs: list[int]
    rb_offs: list[int]
    data_offs: list[int]

    @classmethod
    def of(cls, raw: bytes) -> "Layout":
        cs = 1 << struct.unpack_from(">I", raw, 20)[0]
        l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", raw, 36)
        u64 = lambda off: struct.unpack_from(">Q", raw, off)[0] if off + 8 <= len(raw) else 0  # noqa: E731
        l2s = [u64(l1_off + 8 * i) & 0x00FFFFFFFFFFFE00 for i in range(l1_size)]
        l2s = [o for o in l2s if o]
        rbs = [u64(rt_off + 8 * i) & ~0x1FF & (1 << 64) - 1 for i in range(rt_clusters * cs // 8)]
        rbs = [o for o in rbs if o]
        data = [u64(l2 + 8 * j) & 0x00FFFFFFFFFFFE00 for l2 in l2s for j in range(cs // 8)]
        return cls(cs, len(raw), l1_off, l1_size, rt_off, rt_clusters * cs // 8, l2s, rbs, [d for d in data if d])


def _interesting_offset(rng: random.Random, lay: Layout) -> int:
    """A host offset chosen to collide, overflow or mislead."""
    pools = [0, lay.l1_off, lay.rt_off, lay.size, lay.size + lay.cs, lay.size - lay.size % lay.cs,
             1 << 56, (1 << 56) - lay.cs, 1 << 62, (1 << 63) - lay.cs, 1 << 63, (1 << 64) - lay.cs,
             0xFFFFFFFFFFFF0000, 0x00FFFFFFFFFFFE00, lay.cs // 2, 3 * lay.cs + 8]
    pools += lay.l2_offs + lay.rb_offs + lay.data_offs
    value = rng.choice(pools)
    if rng.random() < 0.15:
        value = rng.randrange(0, 1 << rng.choice((9, 16, 24, 40, 56, 64)))
    return value & (1 << 64) - 1


_FIELD = {name: (code, first) for name, code, first, _ in HEADER_FIELDS}


def _header_patch(rng: random.Random, lay: Layout, version: int) -> Patch:
    names = [n for n, _, first, _ in HEADER_FIELDS if version >= 3 or first < 72]
    name = rng.choice(names)
    code, first = _FIELD[name]
    bits = struct.calcsize(">" + code) * 8
    limit = (1 << bits) - 1
    choices = [0, 1, limit, limit >> 1, (limit >> 1) + 1, rng.randrange(limit + 1), _interesting_offset(rng, lay) & limit]
    choices += {"header_length": [104, 105, 108, 0xFFF8, lay.cs - 4, lay.cs, lay.cs + 8, 0xFFFFFFF8],
                "cluster_bits": [8, 9, 12, 16, 21, 22, 63],
                "refcount_order": [0, 3, 6, 7, 32],
                "l1_size": [0, lay.l1_size + 1, 1 << 22, (1 << 22) + 1, 1 << 31],
                "refcount_table_clusters": [0, 2, 128, 129, 1 << 20],
                "size": [0, 1, 1 << 40, 1 << 62, (1 << 64) - 512],
                "nb_snapshots": [1, 65536, 65537],
                "incompatible_features": [1, 2, 3, 4, 8, 16, 32, 1 << 63],
                "compression_type": [1, 2, 255],
                "backing_file_size": [8, 1023, 1024, 4096],
                "backing_file_offset": [512, lay.cs - 8, lay.cs, lay.cs + 1]}.get(name, [])
    value = rng.choice(choices) & limit
    return Patch(first, struct.pack(">" + code, value), f"header {name} = {value:#x}")


def _table_patch(rng: random.Random, lay: Layout) -> Patch | None:
    kinds = ["l1"] if lay.l1_size else []
    kinds += ["l2"] * bool(lay.l2_offs) + ["reftable"] + ["refblock"] * bool(lay.rb_offs)
    kind = rng.choice(kinds)
    flags = rng.choice((0, 1 << 63, 1 << 63, 1 << 62, 1, (1 << 63) | 1, 0x7F00000000000000, 0x1FF))
    target = _interesting_offset(rng, lay)
    if kind == "l1":
        at = lay.l1_off + 8 * rng.randrange(lay.l1_size)
    elif kind == "l2":
        at = rng.choice(lay.l2_offs) + 8 * rng.randrange(min(lay.cs // 8, 16) if rng.random() < 0.7 else lay.cs // 8)
    elif kind == "reftable":
        at = lay.rt_off + 8 * rng.randrange(min(lay.rt_len, 4) if rng.random() < 0.7 else lay.rt_len)
        flags = rng.choice((0, 0, 0x1FF, 1))
    else:
        block = rng.choice(lay.rb_offs)
        if rng.random() < 0.3:  # a whole block of maximal counts
            return Patch(block, b"\xff" * lay.cs, f"refblock at {block:#x}: every count maximal")
        at = block + rng.randrange(lay.cs) // 8 * 8
        value = rng.choice((0, 1, 2, (1 << 64) - 1, rng.randrange(1 << 64)))
        return Patch(at, value.to_bytes(8, "big"), f"refblock bytes at {at:#x} = {value:#x}")
    value = (target | flags) & (1 << 64) - 1
    return Patch(at, value.to_bytes(8, "big"), f"{kind} entry at {at:#x} = {value:#x}")


def _overlap_patch(rng: random.Random, lay: Layout) -> Patch:
    """Make two structures share clusters: header fields pointing one table at another."""
    a = rng.choice(("l1_table_offset", "refcount_table_offset"))
    b = rng.choice([lay.l1_off, lay.rt_off, 0] + lay.l2_offs + lay.rb_offs + lay.data_offs)
    code, first = _FIELD[a]
    return Patch(first, struct.pack(">" + code, b), f"overlap: {a} = {b:#x}")


def _extension_patch(rng: random.Random, lay: Layout, version: int) -> Patch:
    at = 104 + rng.randrange(0, 4) * 8 if version >= 3 else 72
    ext_type = rng.choice((0, 0xE2792ACA, 0x6803F857, 0x23852875, 0x0537BE77, 0x44415441, 0x12345678))
    length = rng.choice((0, 8, 15, 16, 48, 0x180, lay.cs, 0xFFFFFFFF))
    body = bytes(rng.randrange(256) for _ in range(rng.choice((0, 8, 16))))
    return Patch(at, struct.pack(">II", ext_type, length) + body, f"extension at {at:#x}: type {ext_type:#x} length {length:#x}")


def _flip_patch(rng: random.Random, raw: bytes) -> Patch:
    at = rng.randrange(len(raw))
    value = rng.randrange(256)
    return Patch(at, bytes([value]), f"byte {at:#x} = {value:#x}")


def generate(seed: int, index: int, cache: dict | None = None) -> ImageCase:
    """Case `index` of run `seed` (deterministic)."""
    rng = random.Random(f"hostile:{seed}:{index}")
    base = _base(rng)
    raw = _cached_build(base, cache)
    lay = Layout.of(raw)
    patches: list[Patch] = []
    truncate = None
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.choice(("header", "header", "table", "table", "table", "overlap", "ext", "flip", "cut"))
        if kind == "header":
            patches.append(_header_patch(rng, lay, base.version))
        elif kind == "table":
            p = _table_patch(rng, lay)
            if p is not None:
                patches.append(p)
        elif kind == "overlap":
            patches.append(_overlap_patch(rng, lay))
        elif kind == "ext":
            patches.append(_extension_patch(rng, lay, base.version))
        elif kind == "flip":
            patches.append(_flip_patch(rng, raw))
        else:
            truncate = rng.choice((0, 71, 104, lay.cs, lay.rt_off + 8, lay.l1_off, len(raw) - 1, len(raw) // 2))
    return ImageCase(index, base, tuple(patches), truncate)


def _cached_build(base: BaseRecipe, cache: dict | None) -> bytes:
    if cache is None:
        return base.build()
    raw = cache.get(base)
    if raw is None:
        if len(cache) > 256:
            cache.clear()
        raw = cache[base] = base.build()
    return raw


def shrink(case: ImageCase, still_fails) -> ImageCase:
    """Drop patches, the truncation and guest writes while `still_fails(case)` holds (greedy, deterministic)."""
    changed = True
    while changed:
        changed = False
        candidates = [dataclasses.replace(case, patches=case.patches[:i] + case.patches[i + 1 :])
                      for i in range(len(case.patches))]
        if case.truncate is not None:
            candidates.append(dataclasses.replace(case, truncate=None))
        w = case.base.writes
        candidates += [dataclasses.replace(case, base=dataclasses.replace(case.base, writes=w[:i] + w[i + 1 :]))
                       for i in range(len(w))]
        for cand in candidates:
            try:
                ok = still_fails(cand)
            except Exception:  # noqa: BLE001 - a candidate whose base no longer builds is just not smaller
                ok = False
            if ok:
                case, changed = cand, True
                break
    return case
