"""The judge's memo of a target's pure judging results: each distinct crash image is inspected, checked, read and recovered once.

The target seam promises that `inspect`, `check`, `read_only` and `recover` are pure
functions of the image bytes and their other arguments (harness/targets/__init__.py).
So a result can be keyed by the image's digest: neighbouring crash points, different
crash states and different raw images that recover to the same bytes then share one
computation. Only the data comparison against the reference model is not memoised (it
depends on the model), and neither is anything that draws from the run's rng.

Hazards, and why the memo is safe against them:

- the digest is XXH3-128 of the bytes (above 4 MiB, of their 256 KiB chunks' digests:
  `digest_bytes`); not cryptographic: nobody crafts crash images to collide; it hashes at
  memory speed, where BLAKE2b cost a tenth of a nightly example; a collision would merge two
  images' results (about 2**-64 for the images of a whole night: accepted, as the runner's
  own image dedup, which uses this digest, already accepts it);
- cached results are shared objects: `Recovery.image` is immutable bytes, or `Extents`
  over immutable bytes that nobody lays anything over (harness/crashstates/images.py), its
  `log` is only read (crash images are built from it), and views are never mutated by the judge;
- memory is bounded by bytes (`max_bytes`: each image and what was derived from it;
  a large image judged as `Extents` lies over its log's base and ops, which many entries
  share, so those buffers are counted once however many entries hold them) and by
  entries, least recently used first, so with 2 MiB clusters a worker holds a few copies
  of an image, not one per crash state;
- `Memo(target, enabled=False)` is the full path: every call goes to the target, which is
  what the differential test compares the memo against.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable

from harness.crashstates.images import Extents, Image, as_bytes, digest_bytes
from harness.targets.readmemo import ReadMemo
from harness.targets import (CheckSummary, HeaderInfo, OpenOptions, ReadOnlyView, Recovery, RecoveryPath,
                             SnapshotReader, Target)

DEFAULT_MAX_BYTES = 48 << 20
DEFAULT_MAX_ENTRIES = 64


def digest(data: bytes | bytearray | Extents) -> bytes:
    """The memo's key for image bytes (the runner's dedup key uses the same hash; `Extents` hash where they lie)."""
    return data.digest() if type(data) is Extents else digest_bytes(data)


class Facts:
    """What is known about one image: its bytes, digest and the target's results computed so far."""

    __slots__ = ("data", "key", "results", "extra", "held")

    def __init__(self, data: Image, key: bytes) -> None:
        self.data = data
        self.key = key
        self.results: dict[tuple, object] = {}
        self.extra = 0  # bytes of derived results (views), held by this entry alone
        self.held: list[int] = []  # the buffers it holds (`_Buffers`), its image's and its results'


class _Buffers:
    """The distinct buffers the memo's entries hold, each counted once however many entries lie over it.

    Hazard: buffers are told apart by `id`, which is safe because each one is held here
    (so it cannot be freed and its id reused) until the last entry holding it goes.
    """

    def __init__(self) -> None:
        self._held: dict[int, list] = {}  # id -> [buffer, entries holding it]
        self.bytes = 0

    def hold(self, buffers) -> list[int]:
        ids = []
        for buf in buffers:
            k = id(buf)
            held = self._held.get(k)
            if held is None:
                self._held[k] = [buf, 1]
                self.bytes += len(buf)
            else:
                held[1] += 1
            ids.append(k)
        return ids

    def release(self, ids: list[int]) -> None:
        for k in ids:
            held = self._held[k]
            held[1] -= 1
            if not held[1]:
                del self._held[k]
                self.bytes -= len(held[0])


def _buffers_of(image) -> list:
    """The distinct buffers an image's bytes lie in: itself, or its extents' sources."""
    if type(image) is not Extents:
        return [image]
    return list({id(src): src for _a, _b, src, _o in image.parts if src is not None}.values())


def _recovery_buffers(rec: Recovery) -> list:
    """What a memoised recovery holds: its image's buffers, its log's base and the data of its log's ops."""
    out = _buffers_of(rec.image) if rec.image is not None else []
    if rec.log is not None:
        out += _buffers_of(rec.log.base)
        out += [op.data for op in rec.log.ops if op.data]
    return out


class Memo:
    """A bounded LRU of `Facts` by digest, in front of one target's judging functions."""

    def __init__(self, target: Target, *, enabled: bool = True, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.target = target
        self.enabled = enabled
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, Facts] = OrderedDict()
        self._buffers = _Buffers()
        self._extra = 0
        self.hits = 0
        self.misses = 0
        # A target whose check and recovery can be keyed by the bytes they read (the python
        # target, harness/targets/readmemo.py) shares results between images differing only
        # where nothing read them: guest data, mostly.
        self.reads = ReadMemo() if enabled and _reuses_reads(target) else None
        self._reuse = {"reuse": self.reads} if self.reads is not None else {}
        self._reuse_view = self._reuse if self.reads is not None and _reuses_reads(target, ("read_only",)) else {}
        self._reuse_snapshots = self._reuse if self.reads is not None and _reuses_reads(target, ("snapshots",)) else {}
        # A large image may reach the memo as `Extents` (harness/crashstates/images.py); a target that
        # cannot judge those, or the full path, gets it joined.
        self._extents = enabled and _judges_extents(target)

    def has(self, key: bytes) -> bool:
        """Whether the memo holds the facts of the image with digest `key` (then `facts(None, key)` gives them)."""
        return self.enabled and key in self._entries

    def facts(self, data: Image | bytearray | None, key: bytes | None = None) -> Facts:
        """The facts of `data` (`key`, its digest, when the caller has it already; `data` may be None when `has(key)`).

        A bytearray is copied to bytes only when the image is new to the memo (with 2 MiB
        clusters an image is tens of MiB, and most crash images repeat); `Extents` are kept
        as they are for a target that judges them, else joined then.
        """
        if not self.enabled:
            assert data is not None
            return Facts(as_bytes(data), b"")
        key = key or digest(data)
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            return found
        if data is None:
            raise ValueError(f"imagememo: no facts held for digest {key.hex()} and no image bytes given")
        facts = Facts(data if type(data) is Extents and self._extents else as_bytes(data), key)
        self._entries[key] = facts
        if type(facts.data) is Extents:
            facts.held = self._buffers.hold(_buffers_of(facts.data))
        else:  # (a buffer of its own: counted whole per entry, as the results derived from it are)
            facts.extra = len(facts.data)
            self._extra += facts.extra
        self._evict()
        return facts

    @property
    def _bytes(self) -> int:
        """What the entries hold: each distinct buffer once, and their derived results."""
        return self._buffers.bytes + self._extra

    def _evict(self) -> None:
        # The newest entry always stays, however large: the judge is using it.
        while len(self._entries) > 1 and (self._bytes > self.max_bytes or len(self._entries) > self.max_entries):
            _key, old = self._entries.popitem(last=False)
            self._buffers.release(old.held)
            self._extra -= old.extra

    def _get(self, facts: Facts, key: tuple, compute, weigh=lambda _r: 0, holds=None):
        if not self.enabled:
            return compute()
        results = facts.results
        if key in results:
            self.hits += 1
            return results[key]
        self.misses += 1
        value = compute()
        results[key] = value
        extra = weigh(value)
        buffers = holds(value) if holds is not None else ()
        if (extra or buffers) and self._entries.get(facts.key) is facts:
            facts.extra += extra
            self._extra += extra
            facts.held += self._buffers.hold(buffers)
            self._evict()
        return value

    # ---- the target's judging functions, memoised ------------------------------------------------
    def inspect(self, facts: Facts) -> HeaderInfo:
        return self._get(facts, ("inspect",), lambda: self.target.inspect(facts.data))

    def check(self, facts: Facts, *, past_eof: bool = False) -> CheckSummary:
        return self._get(facts, ("check", past_eof),
                         lambda: self.target.check(facts.data, past_eof=past_eof, **self._reuse))

    def read_only(self, facts: Facts, sectors: frozenset[int], *, allocated: bool = True) -> ReadOnlyView:
        return self._get(facts, ("read_only", sectors, allocated),
                         lambda: self.target.read_only(facts.data, sectors, allocated=allocated, **self._reuse_view),
                         lambda view: 600 * len(view.sectors))

    def snapshots(self, facts: Facts) -> SnapshotReader:
        """The image's snapshot reader; with the memo on, its `read_many` results are memoised too.

        The full path (memo off) gets the target's reader without `read_many`, so the
        snapshot rules read one sector at a time as they always did.
        """
        if not self.enabled:
            return dataclasses.replace(self.target.snapshots(facts.data), read_many=None)
        reader = self._get(facts, ("snapshots",), lambda: self.target.snapshots(facts.data, **self._reuse_snapshots),
                           lambda _r: len(facts.data))  # the reader holds an open copy of the image
        many = reader.read_many
        if many is None:
            return reader

        def read_many(name: str, sectors: list[int]) -> dict[int, bytes]:
            return self._get(facts, ("snapshot", name, tuple(sectors)), lambda: many(name, sectors),
                             lambda got: 600 * len(got))

        return dataclasses.replace(reader, read_many=read_many)

    def recover(self, facts: Facts, path: RecoveryPath, options: OpenOptions, *, record: bool) -> tuple[Recovery, Facts | None]:
        """The recovery of `facts`' image, and the facts of the recovered image (None when recovery failed).

        A target with `recover_checked` also says what `check(recovered, past_eof=True)`
        gives when the recovery computed it on the final bytes; the memo records it.
        """
        def compute():
            checked = _checked_recovery(self.target)
            handed: list[tuple[bytes, bytes]] = []  # (image, its digest) as image_for gave them

            def image_for(key: bytes, join) -> bytes:
                # A replayed recovery's image known here already is not joined again (readmemo.replay_writes).
                found = self._entries.get(key)
                data = found.data if found is not None else join()
                handed.append((data, key))
                return data

            if checked is not None:
                extra = {"image_for": image_for} if self._reuse else {}
                rec, known = checked(facts.data, path, options, record=record,
                                     raw_check=facts.results.get(("check", False)), **self._reuse, **extra)
            else:
                rec, known = self.target.recover(facts.data, path, options, record=record), None
            if rec.image is None:
                return rec, None, known
            key = next((k for data, k in handed if data is rec.image), None)
            return rec, key or digest(rec.image), known

        def holds(value) -> list:
            rec = value[0]
            return _recovery_buffers(rec) if type(rec.image) is Extents else []

        def weigh(value) -> int:
            rec = value[0]
            if type(rec.image) is Extents:
                return 0  # (its buffers are held, each counted once: `holds`)
            size = len(rec.image or b"")
            if rec.log is not None:
                size += len(rec.log.base) + sum(len(op.data) for op in rec.log.ops)
            return size

        if not self.enabled:  # the full path: the target's own recover, nothing learnt on the side
            rec = self.target.recover(facts.data, path, options, record=record)
            return rec, (None if rec.image is None else Facts(rec.image, b""))
        rec, key, known = self._get(facts, ("recover", path, options, record), compute, weigh, holds)
        if rec.image is None:
            return rec, None
        recovered = self.facts(rec.image, key)
        if known is not None:
            recovered.results.setdefault(("check", True), known)
        return rec, recovered


def _declared(target: Target, flag: str, names: tuple[str, ...]) -> bool:
    """Whether the target sets `flag` and the class that sets it also defines every one of `names`
    (a subclass that overrides one of them below, a test double or a wrapper, did not promise the flag)."""
    if not getattr(target, flag, False):
        return False
    mro = type(target).__mro__
    owner = next(k for k in mro if flag in vars(k))
    return all(next(k for k in mro if name in vars(k)) is owner for name in names)


def _reuses_reads(target: Target, names: tuple[str, ...] = ("check", "recover", "recover_checked")) -> bool:
    """Whether the target's `names` (check and recover_checked) take a ReadMemo."""
    return _declared(target, "reuses_reads", names)


def _judges_extents(target: Target) -> bool:
    """Whether the target's judging functions take `Extents` (`judges_extents`)."""
    return _declared(target, "judges_extents", ("inspect", "check", "read_only", "snapshots", "recover",
                                                 "recover_checked"))


def _checked_recovery(target: Target):
    """The target's `recover_checked`, unless a subclass overrides `recover` (a test double, a wrapper) below it."""
    mro = type(target).__mro__
    owner = next((k for k in mro if "recover_checked" in vars(k)), None)
    if owner is None or next(k for k in mro if "recover" in vars(k)) is not owner:
        return None
    return target.recover_checked  # type: ignore[attr-defined]


def sectors_key(sectors: Iterable[int]) -> frozenset[int]:
    """A read set as a memo key."""
    return sectors if isinstance(sectors, frozenset) else frozenset(sectors)
