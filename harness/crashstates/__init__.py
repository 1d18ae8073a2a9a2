"""Crash states: the named choices of which unsynced host operations a crash keeps, tears or cuts, and their images.

A crash state is taken at a crash point p of a `WriteLog` (ops[0:p] happened). Everything
up to the last flush before p is kept (device model rule 1, see `harness.faultfile`);
the state chooses among the ops of the unsynced epoch U (the WRITE and TRUNCATE ops
after that flush and before p; n = len(U)). A state is a plain, printable choice:

    point    the crash point p
    policy   which policy produced it (a label: the image depends only on the fields below)
    kept     log indices of the unsynced ops that survive, applied in log order
    tears    for some kept writes, the kept sectors of that write (the others did not land)
    size     if set, the file is cut back to this many bytes at the end (lost growth)
    garbage  if set, a torn write's sectors that did not land hold garbage from this seed

Its id is one line, for example ``p=17 subsets keep=0,2,5``,
``p=17 torn keep=0-2 tear=2:0-3,5``, ``p=9 truncate keep=4-8 size=196608`` or
``p=9 garbage keep=4-8 tear=6:0 garbage=0``. Index lists print ascending, with runs of
two or more as ``a-b``, and ``none`` for an empty keep list. `CrashState.parse` accepts
exactly this canonical form, so ``parse(s.id) == s`` and ``parse(t).id == t``.

Sectors of a write are its pieces between the host file's absolute 512-byte boundaries
(`harness.faultfile.sector_pieces`): a write at offset 256 of length 1024 has three
sectors, [256, 512), [512, 1024) and [1024, 1280). Write m(w) for that number.

The policies, and exactly how many states each defines at a point
-----------------------------------------------------------------

``drop-unsynced``: keep none of U. The durable image. 1 state.

``prefix``: keep all of U. The file exactly as it was at the crash point. 1 state.

``subsets``: keep any subset of U (rule 2), nothing torn or cut. 2**n states; the
empty and the full subset are the ``drop-unsynced`` and ``prefix`` choices.

``torn``: keep all of U, but tear exactly one write w of U with m(w) >= 2: w keeps a
non-empty proper subset of its sectors (rule 3); the sectors that did not land read as
the bytes before w (zeros past the old end of file), and the file still grows to w's end
(a torn write's growth is kept; losing growth is the ``truncate`` policy).
sum over those w of (2**m(w) - 2) states.

``truncate``: keep all of U, then cut the file back to a size c (rule 4). The candidate
sizes c are, strictly below the size at the crash point: the durable size, the size
after each op of U (so the end of every growth-causing op and every truncate), and for
each op of U that grew the file from a to b, the last 512-byte boundary strictly between
a and b (the growth lost only its last sector). Every candidate is at least the smallest
size the file had since the last flush, so the cut never goes below what the contract
allows. One state per distinct candidate.

``garbage`` (harsh mode, not in `DEFAULT_POLICIES`): the ``torn`` states, with the
sectors that did not land holding seeded garbage instead of the old bytes (rule 6). The
garbage seed is the enumeration seed; it fixes the bytes but is not a dimension of the
space, so the count equals the ``torn`` count.

Counts are exact Python ints (``2**n`` for 40 unsynced writes, ``2**128 - 2`` for one
torn 64 KiB write) and do not depend on how many states are enumerated.

Enumeration and sampling
------------------------

`enumerate_states` lists a policy's whole space when it holds at most
``max(2**k, samples)`` states (so ``subsets`` is exhaustive up to k unsynced ops).
Above that it returns exactly `samples` distinct states, drawn by a `random.Random`
seeded from (seed, point, policy), so a seed reproduces the list:

- ``subsets``: always the none-kept and the all-kept extremes first, then in turn an
  omit-one state, a keep-only-one state and a uniformly random subset.
- ``torn``/``garbage``: in turn a prefix tear (the write stopped after j sectors), a
  suffix tear (only its last sectors landed) and a random non-empty proper subset, each
  of a write chosen in turn or at random. Both policies draw the same tears for a seed.
- ``truncate``: always the smallest and the largest candidate, then random candidates.

Exhaustive lists come in a fixed order: subsets by size and then lexicographically,
tears by write and then likewise, truncations by ascending size.

Deduplication
-------------

States are compared as *choices* (point, kept, tears, size, garbage), never as images.
Within one policy every listed state is a distinct choice. Across policies the only
coinciding choices are ``drop-unsynced`` and ``prefix`` with the empty and full
``subsets`` choice (and with each other when n == 0, where every keep-policy collapses to
the one durable image); ``torn``, ``garbage`` and ``truncate`` choices are disjoint from
everything else by definition. `count_states` counts each policy's own space honestly,
duplicates included; `enumerate_point` and `space_report`'s distinct totals drop the
duplicates. Different choices can still give byte-identical images (a kept write that a
later kept write fully overwrites; a tear whose sectors a later write covers; the same
image at neighbouring points): image-level dedup is left to the runner, which hashes
images anyway.

The modules: `state` (the state, its policy and id), `spaces` (counts, enumeration and
sampling), `images` (building a state's bytes), `report` (coverage of the space).
"""

from harness.crashstates.images import CrashImageBuilder
from harness.crashstates.report import PolicySpace, SpaceReport, space_report
from harness.crashstates.spaces import count_states, enumerate_point, enumerate_states, truncate_candidates
from harness.crashstates.state import DEFAULT_POLICIES, CrashState, Policy, Tears, range_runs

__all__ = [
    "Policy",
    "DEFAULT_POLICIES",
    "CrashState",
    "Tears",
    "range_runs",
    "count_states",
    "enumerate_states",
    "enumerate_point",
    "truncate_candidates",
    "CrashImageBuilder",
    "PolicySpace",
    "SpaceReport",
    "space_report",
]
