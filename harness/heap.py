"""The worker's heap: garbage collected after large images, what lived before an example kept out of its collections, the young generation sized for judging, and glibc's malloc thresholds."""

from __future__ import annotations

import contextlib
import gc

_COLLECT_ABOVE = 4 << 20  # image bytes from which judging a state counts toward a garbage collection
_COLLECT_EVERY = 24 << 20  # bytes of such images judged between two collections
# Allocations (net) between two young-generation collections while an example runs; CPython's
# default is 700. Judging a crash state allocates thousands of short-lived containers (sector
# views of thousands of entries, check lines), so at 700 the collector ran 735 times over 40 dev
# examples and traversed those containers each time: 0.55 s of 7.0 s (`gc.callbacks`, seed 7),
# 0.54 s of 9.5 s on a 512-byte-cluster nightly example. At 5,000 that was 0.21 s and 0.18 s.
# Hazard: garbage in reference cycles lives longer. An image left open in one (its table caches
# call back into it) then holds its bytes: before snapshot readers released theirs
# (targets/python.py, `_Opened`), 5,000 took a nightly 4 KiB-cluster example from 387 to 687 MiB
# peak RSS; since, from 290 to 294 MiB (dev at 2 MiB clusters: 182 to 187 MiB). Large images
# are collected by `collect_after` regardless.
_YOUNG = 5000


def collect_after(image: bytes | bytearray) -> None:
    """Collect garbage after judging a large image.

    The images opened while judging sit in reference cycles (a table cache calls back into
    its image) that the cyclic collector frees only after enough *objects* were allocated;
    large images are few objects and many bytes, so without this a worker with 2 MiB
    clusters holds dozens of dead copies. A collection follows every
    `_COLLECT_EVERY` bytes of such images: after each one with 2 MiB clusters (20 MiB and
    more), after every third with 1 MiB clusters. What the collection frees goes back to the
    system as `tune_malloc` says, not by a trim here.
    """
    if len(image) < _COLLECT_ABOVE:
        return
    _HEAP.pending += len(image)
    if _HEAP.pending >= _COLLECT_EVERY:
        _HEAP.pending = 0
        _HEAP.freeze_once()
        gc.collect()


class _HeapFreeze:
    """Keeps what lived before an example's first large collection out of its later ones.

    A full collection walks every tracked object in the worker: after a few hundred
    examples the memos and caches hold some 400,000, and each collection after a large
    image then cost 0.1 s instead of 6 ms (a 512 KiB-cluster example: 5.4 s instead of
    1.3 s). Inside `frozen_heap()`, the first collection freezes the survivors (gc.freeze)
    and the context's end thaws them; cyclic garbage among them waits for the thaw.
    Outside the context every collection is a plain full one. Inside it the young
    generation is collected every `_YOUNG` allocations, not 700 (restored at its end).
    """

    def __init__(self) -> None:
        self.depth = 0
        self.frozen = False
        self.pending = 0  # bytes of large images judged since the last collection

    def freeze_once(self) -> None:
        if self.depth and not self.frozen:
            gc.collect()
            gc.freeze()
            self.frozen = True

    @contextlib.contextmanager
    def scope(self):
        tune_malloc()
        self.depth += 1
        thresholds = gc.get_threshold()
        if self.depth == 1:
            gc.set_threshold(max(thresholds[0], _YOUNG), *thresholds[1:])
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth:
                gc.set_threshold(*thresholds)
                if self.frozen:
                    gc.unfreeze()
                    self.frozen = False


_HEAP = _HeapFreeze()
frozen_heap = _HEAP.scope


# glibc's malloc for a judging worker (`tune_malloc`). By default its mmap threshold rises to
# the size of the largest mmapped block freed (up to 32 MiB), so once a 20 MiB image was freed
# every later image came from the heap and fragmented it; `collect_after` then gave the free
# heap back with malloc_trim, and the next state faulted those pages in again. On nightly at
# 2 MiB clusters (6 examples, seed 7) that was a quarter of the CPU time, 10-12 s of sys time.
# Fixed instead: blocks from 16 MiB (joined 2 MiB-cluster images) are mmapped and go back to
# the system when freed; smaller ones (tables, reads) reuse the heap; the heap's top is
# returned once 64 MiB of it are free. Measured side by side (nightly and dev 12 at 2 MiB
# clusters, seed 7): 27.3 -> 38.0 and 51.1 -> 67.8 states/s; peak RSS 281 -> 279 and
# 187 -> 217 MiB. Without the trim and without fixed thresholds peak RSS reached 301 MiB.
_MMAP_FROM = 16 << 20
_TRIM_ABOVE = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)


def _load_mallopt():
    """glibc's mallopt; None elsewhere (another allocator keeps its own policy)."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.mallopt if hasattr(libc, "malloc_trim") else None  # (glibc's, not musl's)
    except (OSError, AttributeError):
        return None


_MALLOPT = _load_mallopt()
_TUNED: list[bool] = []


def tune_malloc() -> bool:
    """Set the worker's malloc thresholds for judging, once per process; whether they are set."""
    if not _TUNED:
        ok = _MALLOPT is not None and bool(_MALLOPT(_M_MMAP_THRESHOLD, _MMAP_FROM)) \
            and bool(_MALLOPT(_M_TRIM_THRESHOLD, _TRIM_ABOVE))
        _TUNED.append(ok)
    return _TUNED[0]
