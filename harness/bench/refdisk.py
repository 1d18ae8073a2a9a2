"""Benchmark of the reference disk model: operations per second, peak memory and judge() throughput on a 64 MiB disk.

Usage: python -m harness.bench.refdisk REPORT_DIR   (writes REPORT_DIR/bench_refdisk.json)
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from models.payload import make_payload
from models.refdisk import ReferenceDisk

DISK_SIZE = 64 << 20
WRITES = 300
SEED = 20240601
FLUSH_EVERY = 16
DISCARD_EVERY = 25


def _workload(rng: random.Random) -> list[tuple[str, int, int]]:
    """(kind, offset, length): WRITES writes of 4..64 KiB at 4 KiB-aligned offsets, with flushes and a few discards."""
    ops: list[tuple[str, int, int]] = []
    writes = 0
    while writes < WRITES:
        length = rng.randint(1, 16) * 4096
        offset = rng.randrange(0, (DISK_SIZE - length) // 4096 + 1) * 4096
        ops.append(("write", offset, length))
        writes += 1
        if writes % DISCARD_EVERY == 0:
            ops.append(("discard", rng.randrange(0, DISK_SIZE // 65536) * 65536, 65536))
        if writes % FLUSH_EVERY == 0:
            ops.append(("flush", 0, 0))
    return ops


def _apply(disk: ReferenceDisk, ops: list[tuple[str, int, int]], payloads: dict[int, bytes]) -> None:
    for index, (kind, offset, length) in enumerate(ops):
        if kind == "write":
            disk.begin_write(index, offset, payloads[index])
        elif kind == "discard":
            disk.begin_discard(index, offset, length)
        else:
            disk.begin_flush(index)
        disk.complete(index)


def run(report_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Run the benchmark, write bench_refdisk.json into `report_dir`, and return the figures."""
    ops = _workload(random.Random(SEED))
    write_bytes = sum(length for kind, _, length in ops if kind == "write")

    t0 = time.perf_counter()
    payloads = {i: make_payload(i, offset, length, SEED) for i, (kind, offset, length) in enumerate(ops) if kind == "write"}
    payload_s = time.perf_counter() - t0

    disk = ReferenceDisk(DISK_SIZE, "writeback", discard_granularity=65536)
    t0 = time.perf_counter()
    _apply(disk, ops, payloads)
    ops_s = time.perf_counter() - t0

    # Memory on a fresh run, payloads already built (they belong to the workload, not the model).
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    traced = ReferenceDisk(DISK_SIZE, "writeback", discard_granularity=65536)
    _apply(traced, ops, payloads)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del traced

    # A crash state to judge: the last few writes in flight, the image holding the model's current view.
    tail = len(ops)
    for k in range(4):
        length = 65536
        offset = k * 8 << 20
        disk.begin_write(tail + k, offset, make_payload(tail + k, offset, length, SEED))
    t0 = time.perf_counter()
    image = disk.read(0, DISK_SIZE)
    read_s = time.perf_counter() - t0

    def read_fn(offset: int, length: int) -> bytes:
        return image[offset : offset + length]

    touched = len(disk.touched_sectors())
    t0 = time.perf_counter()
    verdicts = disk.judge(read_fn)
    judge_s = time.perf_counter() - t0
    all_sectors = range(DISK_SIZE // 512)
    t0 = time.perf_counter()
    verdicts_all = disk.judge(read_fn, sectors=all_sectors)
    judge_all_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    clone = disk.copy()
    copy_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    clone.collapse(read_fn)
    collapse_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    digest = disk.digest()
    digest_s = time.perf_counter() - t0

    n_ops = len(ops)
    figures: dict[str, Any] = {
        "benchmark": "refdisk",
        "python": platform.python_version(),
        "disk_size": DISK_SIZE,
        "workload": {
            "ops": n_ops,
            "writes": WRITES,
            "write_bytes": write_bytes,
            "flushes": sum(1 for k, _, _ in ops if k == "flush"),
            "discards": sum(1 for k, _, _ in ops if k == "discard"),
            "seed": SEED,
        },
        "payload_generation": {"seconds": payload_s, "mib_per_s": write_bytes / payload_s / (1 << 20)},
        "model_ops": {
            "seconds": ops_s,
            "ops_per_s": n_ops / ops_s,
            "mib_per_s": write_bytes / ops_s / (1 << 20),
        },
        "memory": {"retained_bytes": current - base, "peak_bytes": peak - base, "touched_sectors": touched},
        "read_whole_disk_s": read_s,
        "judge_touched": {
            "sectors": touched,
            "seconds": judge_s,
            "sectors_per_s": touched / judge_s if judge_s else None,
            "verdicts": len(verdicts),
        },
        "judge_all": {
            "sectors": len(all_sectors),
            "seconds": judge_all_s,
            "sectors_per_s": len(all_sectors) / judge_all_s,
            "mib_per_s": DISK_SIZE / judge_all_s / (1 << 20),
            "verdicts": len(verdicts_all),
        },
        "copy_s": copy_s,
        "collapse_s": collapse_s,
        "digest_s": digest_s,
        "digest": digest,
    }
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_refdisk.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return figures


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: python -m harness.bench.refdisk REPORT_DIR (got {len(argv) - 1} arguments)", file=sys.stderr)
        return 2
    f = run(argv[1])
    print(
        f"refdisk: {f['workload']['ops']} ops in {f['model_ops']['seconds'] * 1e3:.1f} ms "
        f"({f['model_ops']['ops_per_s']:.0f} ops/s, {f['model_ops']['mib_per_s']:.1f} MiB/s); "
        f"peak {f['memory']['peak_bytes'] / (1 << 20):.1f} MiB, retained {f['memory']['retained_bytes'] / (1 << 20):.1f} MiB "
        f"for {f['memory']['touched_sectors']} touched sectors; "
        f"judge {f['judge_touched']['sectors_per_s']:.0f} sectors/s (touched), "
        f"{f['judge_all']['mib_per_s']:.1f} MiB/s (whole disk)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
