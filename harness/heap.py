"""The worker's heap: garbage collected after large images, what lived before an example kept out of its collections, and the young generation sized for judging."""

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
    clusters holds dozens of dead copies. A collection (and the heap trim) follows every
    `_COLLECT_EVERY` bytes of such images: after each one with 2 MiB clusters (20 MiB and
    more), after every third with 1 MiB clusters.
    """
    if len(image) < _COLLECT_ABOVE:
        return
    _HEAP.pending += len(image)
    if _HEAP.pending >= _COLLECT_EVERY:
        _HEAP.pending = 0
        _HEAP.freeze_once()
        gc.collect()
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)


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


def _load_malloc_trim():
    """glibc's malloc_trim, which gives freed heap memory back to the system; None elsewhere.

    glibc serves a freed 20 MiB image's successors from its heap once its mmap threshold
    has risen, and the heap's free space then stays in the worker's RSS.
    """
    try:
        import ctypes
        import ctypes.util

        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()
