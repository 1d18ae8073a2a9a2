"""Bounded-exhaustive mode: every operation sequence up to N ops over a small alphabet, every crash state of each, judged by the same oracle.

Every sequence of length 1..N over the alphabet is run; only the crash states of its *last*
operation are swept (`Budget.sweep` is off for the others). Execution is deterministic and
seeded alike, so the crash states of a sequence's op #i are exactly those of its prefix of
length i+1: over the whole enumeration every crash state of every sequence is judged, once.
Each sequence also ends with a clean close that must leave a clean image equal to the model.

Hazard: the global index of a (configuration, sequence) pair is the unit of sharding and of
resuming; it depends on the alphabet, the configurations and N, so the progress file records
them and a resume with different ones is refused.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from harness import coverage
from harness.config import Config
from harness.errors import QcrashError
from harness.ops import Crash, Discard, Flush, Op, Reopen, Write, WriteZeroes
from harness.runner import Budget, Runner
from harness.stats import Stats
from models.blockio import SECTOR

CLUSTER_CLASSES = (512, 4096, 65536)
# Every point of the last op, every state of every default policy (subsets and torn exhaustive
# up to 2**8 sectors, sampled 16 per point beyond); no recovery-crash step unless --deep.
BUDGET = Budget(samples=16, states_per_op=1_000_000, recovery_points=2, recovery_every=0)
DEEP_BUDGET = dataclasses.replace(BUDGET, recovery_points=8, recovery_every=1)
PROGRESS = "progress.jsonl"


class ExhaustError(QcrashError):
    """Bad exhaust input: an unknown alphabet, or a progress file from a different run."""


def _ranges(config: Config) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two ranges: the first cluster, and the last cluster of the disk (another L2 table when the disk spans several)."""
    c = min(config.cluster_size, config.virtual_size)
    return (0, c), (config.virtual_size - c, c)


def _default(config: Config) -> list[Op]:
    letters: list[Op] = []
    for kind in (Write, WriteZeroes, Discard):
        letters += [kind(off, length) for off, length in _ranges(config)]
    return letters + [Flush(), Reopen()]


def _small(config: Config) -> list[Op]:
    (off, length), _ = _ranges(config)
    return [Write(off, length), Discard(off, length), Flush()]


def _switch(config: Config) -> list[Op]:
    other = "writethrough" if config.cache_mode != "writethrough" else "writeback"
    extra: list[Op] = [Reopen(cache_mode=other)]
    if config.version == 3:
        extra.append(Reopen(lazy_refcounts=not config.lazy_refcounts))
    return _default(config) + extra


def _crash(config: Config) -> list[Op]:
    # Crash after the last host op, losing what was not flushed, then continue on the recovered image:
    # how leaked clusters come back into use (reuse bugs need it).
    return _default(config) + [Crash(-1, "drop-unsynced", 0)]


def _edge(config: Config) -> list[Op]:
    """Letters at the structure edges the fuzzer's ranges aim at (harness.ranges), where this geometry has them."""
    from harness.ranges import Shape, fill_clusters

    shape, cs = Shape.of(config), config.cluster_size
    letters: list[Op] = []
    if shape.l2_span < config.virtual_size:  # the last cluster of the first L2 table and the first of the second
        letters.append(Write(shape.l2_span - cs, 2 * cs))
    letters += [Write(config.virtual_size - cs, cs),  # the last cluster of the disk, then its last sector alone:
                Discard(config.virtual_size - SECTOR, SECTOR)]  # a partial cluster reaching the disk end
    block = fill_clusters(shape, shape.base_clusters, shape.refblock_span)
    if block * cs <= config.virtual_size:  # a write long enough that allocation needs a new refcount block
        letters.append(Write(0, block * cs))
    return letters + [Flush(), Reopen()]


ALPHABETS: dict[str, tuple[str, Callable[[Config], list[Op]]]] = {
    "default": ("write, write -z and discard of the first and of the last cluster of the disk, flush, reopen (8 letters)",
                _default),
    "small": ("write and discard of the first cluster, flush (3 letters; for quick checks)", _small),
    "switch": ("default, plus reopen switching the cache mode, and (v3) switching lazy refcounts (9-10 letters)",
               _switch),
    "crash": ("default, plus a crash that drops unflushed writes and continues on the recovered image (9 letters)",
              _crash),
    "edge": ("structure edges: a write across the first L2-table boundary (where the disk has two tables), "
             "write of the last cluster, discard of the disk's last sector, a write from 0 long enough to need a new "
             "refcount block (where the disk holds it), flush, reopen (4-6 letters)", _edge),
}


def alphabet(name: str, config: Config) -> list[Op]:
    try:
        return ALPHABETS[name][1](config)
    except KeyError:
        raise ExhaustError(f"--alphabet {name!r}: unknown alphabet; known: {', '.join(ALPHABETS)}") from None


def config_classes(overrides: dict[str, str]) -> list[Config]:
    """One configuration per cluster-size class (v3, lazy refcounts, writeback, 4 MiB), each pinned by `overrides`."""
    base = Config(version=3, cluster_size=4096, lazy_refcounts=True, cache_mode="writeback")
    if overrides.get("version", "").strip() == "2":
        # Config.pinned applies the pins before relaxing lazy refcounts for v2: relax it first.
        base = dataclasses.replace(base, version=2, lazy_refcounts=False)
    sizes = CLUSTER_CLASSES if "cluster_size" not in overrides else (None,)
    configs = []
    for size in sizes:
        config = base if size is None else dataclasses.replace(base, cluster_size=size)
        configs.append(config.pinned(overrides))
    return configs


def sequences(letters: list[Op], n: int) -> Iterator[tuple[Op, ...]]:
    """Every sequence of length 1..n, shortest first, in the alphabet's order."""
    for length in range(1, n + 1):
        yield from itertools.product(letters, repeat=length)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one exhaust run covers: alphabet, configurations, N, budget, injected bugs, shard."""

    alphabet: str
    configs: tuple[Config, ...]
    ops: int
    budget: Budget
    inject: tuple[str, ...] = ()
    shard: tuple[int, int] = (0, 1)

    def items(self) -> Iterator[tuple[int, Config, tuple[Op, ...]]]:
        """(global index, configuration, sequence) of this shard: shard I of N takes indices I, I+N, ..."""
        index = 0
        i, n = self.shard
        for config in self.configs:
            for seq in sequences(alphabet(self.alphabet, config), self.ops):
                if index % n == i:
                    yield index, config, seq
                index += 1

    def identity(self) -> dict:
        """What a progress file must match to be resumed."""
        return {"alphabet": self.alphabet, "configs": [c.to_dict() for c in self.configs], "ops": self.ops,
                "budget": repr(self.budget), "inject": sorted(self.inject), "shard": list(self.shard)}


@dataclasses.dataclass
class SeqResult:
    index: int
    states: int
    seconds: float
    stats: Stats
    finding: dict | None = None  # Finding.to_dict()

    def to_line(self) -> str:
        return json.dumps({"index": self.index, "states": self.states, "seconds": round(self.seconds, 4),
                           "stats": self.stats.to_dict(), "finding": self.finding})


def run_sequence(config: Config, ops: tuple[Op, ...], budget: Budget) -> Runner:
    """Run `ops`, sweeping only the last op's crash states, then close cleanly (unless something was found)."""
    quiet = dataclasses.replace(budget, sweep=False)
    runner = Runner(config, seed=0, budget=quiet)
    for i, op in enumerate(ops):
        runner.budget = budget if i == len(ops) - 1 else quiet
        if runner.step(op):
            return runner
    runner.finish()
    return runner


def _work(args: tuple) -> SeqResult:
    index, config, ops, budget, inject = args
    from models.qcow2 import inject as injectmod

    injectmod.set_active(list(inject))
    t0 = time.perf_counter()
    runner = run_sequence(config, ops, budget)
    finding = runner.findings[0].to_dict() if runner.findings else None
    return SeqResult(index, runner.stats.crash_states, time.perf_counter() - t0, runner.stats, finding)


def read_progress(path: Path, identity: dict) -> dict[int, dict]:
    """Completed sequences of an earlier run of the same plan (a torn last line is ignored)."""
    lines = path.read_text().splitlines() if path.exists() else []
    if not lines:
        return {}  # absent, or killed before the plan line was written
    try:
        head = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        head = None
    if head != {"plan": identity}:
        raise ExhaustError(f"{path}: line 1: the progress file belongs to a different exhaust plan "
                           f"(alphabet, configs, ops, budget, inject or shard differ); use another --out")
    done = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # killed mid-line: that sequence runs again
        done[row["index"]] = row
    return done


def run(plan: Plan, out: Path, *, jobs: int = 1, on_result: Callable[[SeqResult], None] | None = None,
        first: bool = False) -> dict:
    """Run (or resume) the plan; record findings as reproducers in `out`; return the summary (also exhaust.json/.md)."""
    from harness.fuzz import corpus

    out.mkdir(parents=True, exist_ok=True)
    path = out / PROGRESS
    identity = plan.identity()
    done = read_progress(path, identity)
    if not done and not (path.exists() and path.read_text().strip()):
        path.write_text(json.dumps({"plan": identity}) + "\n")
    items = {index: (config, ops) for index, config, ops in plan.items()}
    todo = [(i, c, ops, plan.budget, plan.inject) for i, (c, ops) in items.items() if i not in done]
    t0 = time.perf_counter()
    with path.open("a") as progress:
        for result in _results(todo, jobs):
            if result.finding is not None:
                _record(corpus, out, plan, *items[result.index], result.finding)
            progress.write(result.to_line() + "\n")
            progress.flush()
            done[result.index] = json.loads(result.to_line())
            if on_result:
                on_result(result)
            if first and result.finding is not None:
                break  # the rest stays in the progress file's to-do: a later run without --first resumes
    summary = summarize(plan, done, items, time.perf_counter() - t0)
    write_summary(out, summary)
    return summary


def _results(todo: list[tuple], jobs: int) -> Iterator[SeqResult]:
    if jobs <= 1:
        yield from map(_work, todo)
        return
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap_unordered(_work, todo, chunksize=4)


def _record(corpus, out: Path, plan: Plan, config: Config, ops: tuple[Op, ...], finding: dict) -> None:
    from harness.oracle import Finding

    rep = corpus.Reproducer(config, list(ops), 0, plan.budget, Finding.from_dict(finding), None, sorted(plan.inject),
                            shrunk_from=len(ops))
    corpus.record(out, rep)


def summarize(plan: Plan, done: dict[int, dict], items: dict, seconds: float) -> dict:
    stats = Stats()
    findings: dict[str, int] = {}
    for index in sorted(done):
        row = done[index]
        stats.merge(Stats.from_dict(row["stats"]))
        if row["finding"]:
            sig = f"{row['finding']['verdict']}@{row['finding']['op_kind']}/{row['finding']['policy'] or '-'}/{row['finding']['phase']}"
            findings[sig] = findings.get(sig, 0) + 1
    per_config = [{"config": str(c), "letters": [repr(op) for op in alphabet(plan.alphabet, c)]} for c in plan.configs]
    return {"complete": len(done) == len(items), "sequences": len(done), "sequences_planned": len(items),
            "crash_states": stats.crash_states, "sequences_with_findings": sum(findings.values()),
            "findings": findings, "seconds_this_run": round(seconds, 2),
            "sequence_seconds": round(sum(r["seconds"] for r in done.values()), 2),
            "covered": {"alphabet": plan.alphabet, "alphabet_text": ALPHABETS[plan.alphabet][0],
                        "max_ops": plan.ops, "configs": per_config,
                        "policies": list(plan.budget.policies), "budget": repr(plan.budget),
                        "inject": sorted(plan.inject), "shard": f"{plan.shard[0]}/{plan.shard[1]}"},
            "by_policy": dict(stats.by_policy), "events": dict(sorted(stats.events.items())),
            "events_by_class": coverage.table(stats.events)}


def write_summary(out: Path, summary: dict) -> None:
    from harness.fuzz.corpus import atomic_write, atomic_write_json

    atomic_write_json(out / "exhaust.json", summary)
    cov = summary["covered"]
    lines = [f"# qcrash exhaust: {summary['sequences']}/{summary['sequences_planned']} sequences, "
             f"{summary['crash_states']} crash states, {summary['sequences_with_findings']} with findings", "",
             f"- alphabet `{cov['alphabet']}`: {cov['alphabet_text']}",
             f"- every sequence of 1..{cov['max_ops']} letters; every crash state of each op under the policies "
             f"{', '.join(cov['policies'])} (subsets and torn: every state up to 2**{BUDGET.k}, 16 sampled beyond)",
             f"- budget `{cov['budget']}`", f"- shard {cov['shard']}; injected bugs: {', '.join(cov['inject']) or 'none'}",
             f"- time: {summary['sequence_seconds']} s of sequence work (this invocation {summary['seconds_this_run']} s)",
             "", "| configuration | letters |", "|---|---|"]
    lines += [f"| {c['config']} | {', '.join(f'`{x}`' for x in c['letters'])} |" for c in cov["configs"]]
    if summary["findings"]:
        lines += ["", "| finding signature | sequences |", "|---|---|"]
        lines += [f"| `{sig}` | {n} |" for sig, n in sorted(summary["findings"].items())]
    lines += ["", *coverage.markdown(coverage.table(summary["events"]))]
    atomic_write(out / "exhaust.md", ("\n".join(lines) + "\n").encode())
