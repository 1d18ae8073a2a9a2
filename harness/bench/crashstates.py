"""Benchmark: crash states built per second from the write log of a 64 MiB image-like file, and peak memory.

Run ``python -m harness.bench.crashstates [REPORT_DIR]``; it writes
``bench_crashstates.json`` there (default ``reports/bench-crashstates-<UTC time>``).
The workload is seeded: a 64 MiB file in a `MemoryFile` under a `FaultInjectingFile`,
a few hundred host writes of 4-64 KiB (about one in ten extends the file) with a flush
every 15-25 writes. Every crash point is then taken under each default policy, with
each policy's states sampled, and every state's image is built into one reused buffer
(the way a runner that checks images one at a time would). A second, shorter pass
builds fresh images (``out=None``) to show the cost of allocating each one, and the
same states again with no durable-image cache (replayed from the base), the baseline.
"""

from __future__ import annotations

import json
import platform
import random
import resource
import sys
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

from harness.crashstates import DEFAULT_POLICIES, CrashImageBuilder, enumerate_states, space_report
from harness.faultfile import FaultInjectingFile
from models.blockio import MemoryFile, WriteSite

MIB = 1 << 20


def make_log(*, image_mib: int = 64, writes: int = 300, seed: int = 0) -> FaultInjectingFile:
    """The seeded workload: random 4-64 KiB writes over an `image_mib` MiB file, a flush every 15-25 writes."""
    rng = random.Random(f"bench-crashstates:{seed}")
    base = bytearray(image_mib * MIB)
    base[:4] = b"QFI\xfb"  # an image-like first cluster; the rest reads as unallocated zeros
    f = FaultInjectingFile(MemoryFile(base, name="bench.qcow2"))
    until_flush = rng.randint(15, 25)
    for i in range(writes):
        length = rng.randrange(4096, 65536 + 1, 512)
        if rng.random() < 0.1:
            offset, site = f.size(), WriteSite.L2_ALLOC  # growth, for the truncate policy
        else:
            offset, site = rng.randrange(0, image_mib * MIB - length, 4096), WriteSite.DATA
        f.pwrite(offset, rng.randbytes(length), site)
        until_flush -= 1
        if until_flush == 0:
            f.flush()
            until_flush = rng.randint(15, 25)
    return f


def run(report_dir: str | Path, *, image_mib: int = 64, writes: int = 300, samples: int = 4, k: int = 2, seed: int = 0) -> dict:
    """Run the benchmark, write ``bench_crashstates.json`` into `report_dir`, and return what it wrote."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    tracemalloc.start()
    started = time.perf_counter()
    f = make_log(image_mib=image_mib, writes=writes, seed=seed)
    log = f.log
    workload_s = time.perf_counter() - started

    builder = CrashImageBuilder(log)
    buf = bytearray()
    per_policy = dict.fromkeys(map(str, DEFAULT_POLICIES), 0)
    enumerate_s = build_s = 0.0
    built = 0
    built_bytes = 0
    for point in range(len(log) + 1):
        for policy in DEFAULT_POLICIES:
            t0 = time.perf_counter()
            states = enumerate_states(log, point, policy, k=k, seed=seed, samples=samples)
            t1 = time.perf_counter()
            for state in states:
                built_bytes += len(builder.build(state, out=buf))
            build_s += time.perf_counter() - t1
            enumerate_s += t1 - t0
            per_policy[str(policy)] += len(states)
            built += len(states)

    del builder, buf
    # Fresh images: a sample of prefix states across the log, each image newly allocated.
    fresh_states = [s for p in range(0, len(log) + 1, max(1, len(log) // 20)) for s in enumerate_states(log, p, "prefix")]
    fresh_builder = CrashImageBuilder(log)
    t0 = time.perf_counter()
    for state in fresh_states:
        fresh_builder.build(state)
    fresh_s = time.perf_counter() - t0
    # Baseline: no durable-image cache, every state replayed from the base (a new builder each time).
    t0 = time.perf_counter()
    for state in fresh_states:
        CrashImageBuilder(log).build(state)
    replay_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    coverage = space_report(log, DEFAULT_POLICIES, k, seed=seed, samples=samples)
    report_s = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    maxrss_bytes = maxrss if sys.platform == "darwin" else maxrss * 1024

    result = {
        "benchmark": "crashstates",
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "params": {"image_mib": image_mib, "writes": writes, "samples": samples, "k": k, "seed": seed},
        "workload": {
            "ops": len(log),
            "points": len(log) + 1,
            "flushes": sum(op.kind == "flush" for op in log),
            "final_size": f.size(),
            "seconds": round(workload_s, 3),
        },
        "states_built": built,
        "states_by_policy": per_policy,
        "build_seconds": round(build_s, 3),
        "enumerate_seconds": round(enumerate_s, 3),
        "states_per_second": round(built / build_s, 1) if build_s else None,
        "image_gib_per_second": round(built_bytes / build_s / 2**30, 2) if build_s else None,
        "fresh_image_states": len(fresh_states),
        "fresh_image_states_per_second": round(len(fresh_states) / fresh_s, 1) if fresh_s else None,
        "replay_from_base_states_per_second": round(len(fresh_states) / replay_s, 1) if replay_s else None,
        "space_report_seconds": round(report_s, 3),
        "coverage": coverage.as_dict(),
        "peak_traced_bytes": traced_peak,
        "peak_rss_bytes": maxrss_bytes,
        "total_seconds": round(time.perf_counter() - started, 3),
    }
    (report_dir / "bench_crashstates.json").write_text(json.dumps(_json_safe(result), indent=2) + "\n")
    return result


def _json_safe(value):
    """Spaces like 2**128 are exact Python ints but not exact in most JSON readers: write those as strings."""
    if isinstance(value, dict):
        return {key: _json_safe(v) for key, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return str(value)
    return value


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print("usage: python -m harness.bench.crashstates [REPORT_DIR]", file=sys.stderr)
        return 2
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report_dir = Path(argv[0]) if argv else Path("reports") / f"bench-crashstates-{stamp}"
    result = run(report_dir)
    r = result
    print(
        f"{r['states_built']} states over {r['workload']['points']} points in {r['build_seconds']} s: "
        f"{r['states_per_second']} states/s reusing a buffer, {r['fresh_image_states_per_second']} states/s "
        f"with fresh images, {r['replay_from_base_states_per_second']} states/s replaying from the base; "
        f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, traced peak {r['peak_traced_bytes'] / 2**20:.0f} MiB "
        f"-> {report_dir / 'bench_crashstates.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
