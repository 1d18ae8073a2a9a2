"""`qcrash bench`: crash states per second, scaling over cores, qcrash against `qemu-img bench`, I/O cost per write, memory.

Every ratio is measured side by side in one run on the same file system; nothing here
asserts a time. Figures go to reports/bench-<UTC time>/bench.json and bench.md.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.fuzz.corpus import atomic_write_json

MIB = 1 << 20


def run(*, quick: bool, out: Path | None = None, baseline: Path | None = None, judging_only: bool = False,
        rounds: int = 1, baseline_python: str | None = None, progress=lambda _line: None) -> Path:
    from harness.bench import judging
    from harness.fuzz.report import utc_stamp

    out = out or Path("reports") / f"bench-{utc_stamp()}"
    out.mkdir(parents=True, exist_ok=True)
    n_writes = 400 if quick else 2000
    fuzz_seconds = 20.0 if quick else 90.0
    results: dict = {"quick": quick, "python": f"{platform.python_version()} ({sys.executable})",
                     "machine": platform.machine(),
                     "cores": os.cpu_count()}
    results["judging"] = judging.measure(
        checkout=Path(__file__).resolve().parents[2], baseline=baseline.resolve() if baseline else None,
        profiles={"dev": 6, "nightly": 2} if quick else {"dev": 20, "nightly": 6},
        cell_seconds=30.0 if quick else 120.0, rounds=rounds, baseline_python=baseline_python, progress=progress)
    if not judging_only:
        results.update(harness=fuzz_throughput(fuzz_seconds), qcow2_throughput=qcow2_vs_qemu(n_writes),
                       io_cost_per_write=io_costs(64 if quick else 256))
    atomic_write_json(out / "bench.json", results)
    (out / "bench.md").write_text(render(results))
    return out


# ---- harness throughput --------------------------------------------------------------------------------
def fuzz_throughput(seconds: float) -> dict:
    """Crash states and examples per second on the default configuration mix, with 1 and with all cores."""
    rows = []
    cores = os.cpu_count() or 1
    for jobs in sorted({1, cores}):
        rows.append(_fuzz_subprocess(jobs, seconds))
    one = rows[0]
    for row in rows:
        row["states_per_second_per_core"] = round(row["crash_states_per_second"] / row["jobs"], 2)
        row["scaling_vs_1_core"] = round(row["crash_states_per_second"] / max(one["crash_states_per_second"], 1e-9), 2)
    return {"rows": rows, "median_states_per_second_1_core": one["median_example_states_per_second"],
            "note": "median over examples of each example's crash states per second, default configuration mix"}


def _fuzz_subprocess(jobs: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import sys, json, resource; from pathlib import Path; from harness.fuzz import engine as fz; "
                f"r = fz.fuzz(fz.FuzzOptions(examples=None, seconds={seconds}, seed=7, jobs={jobs}, profile='dev', "
                f"corpus=Path({tmp!r}))); "
                "import statistics; rates = [o.stats.crash_states / o.seconds for o in r.outcomes if o.seconds > 0]; "
                "print(json.dumps({'examples': len(r.outcomes), 'states': r.stats.crash_states, 'seconds': r.seconds, "
                "'median_example_states_per_second': statistics.median(rates) if rates else 0, "
                "'maxrss_self_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
                "'maxrss_children_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent.parent)
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    worker_kib = data["maxrss_children_kib"] if jobs > 1 else data["maxrss_self_kib"]
    return {"jobs": jobs, "seconds": round(data["seconds"], 2), "examples": data["examples"],
            "crash_states": data["states"],
            "crash_states_per_second": round(data["states"] / data["seconds"], 2),
            "examples_per_second": round(data["examples"] / data["seconds"], 3),
            "median_example_states_per_second": round(data["median_example_states_per_second"], 2),
            "peak_worker_rss_mib": round(worker_kib / 1024, 1)}


# ---- qcow2 throughput against qemu-img bench ----------------------------------------------------------
def qcow2_vs_qemu(n: int) -> dict:
    """n allocating 64 KiB writes into a new 4 GiB image, on the same file system, qcrash then QEMU."""
    rows = []
    have_qemu = shutil.which("qemu-img") is not None
    with tempfile.TemporaryDirectory(dir=os.environ.get("QCRASH_BENCH_DIR")) as tmp:
        for cache in ("writeback", "writethrough"):
            for lazy in (False, True):
                ours = _qcrash_bench(Path(tmp) / "q.qcow2", n, cache, lazy)
                row = {"cache": cache, "lazy_refcounts": lazy, "writes": n, "qcrash_seconds": round(ours, 4),
                       "qcrash_writes_per_second": round(n / ours, 1)}
                if have_qemu:
                    theirs = _qemu_bench(Path(tmp) / "e.qcow2", n, cache, lazy)
                    row.update(qemu_seconds=round(theirs, 4), qemu_writes_per_second=round(n / theirs, 1),
                               ratio_qcrash_over_qemu=round(ours / theirs, 2))
                rows.append(row)
    return {"rows": rows, "qemu": _qemu_version() if have_qemu else None,
            "note": "ratio = qcrash time / qemu-img bench time for the same writes (higher = qcrash slower)"}


def _qcrash_bench(path: Path, n: int, cache: str, lazy: bool) -> float:
    from models.blockio import OsFile
    from models.qcow2 import Qcow2Image

    f = OsFile(path, create=True)
    Qcow2Image.create(f, 4 << 30, lazy_refcounts=lazy)
    img = Qcow2Image.open(f, cache_mode=cache)
    data = b"\xa5" * 65536
    t0 = time.perf_counter()
    for i in range(n):
        img.write(i * 65536, data)
    img.flush()  # qemu-img bench flushes at the end of its timed loop
    elapsed = time.perf_counter() - t0
    img.close()
    f.close()
    return elapsed


def _qemu_bench(path: Path, n: int, cache: str, lazy: bool) -> float:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"lazy_refcounts={'on' if lazy else 'off'}",
                    str(path), "4G"], check=True)
    proc = subprocess.run(["qemu-img", "bench", "-w", "-t", cache, "-d", "1", "-s", "64k", "-S", "64k", "-c", str(n),
                           "-f", "qcow2", str(path)], check=True, capture_output=True, text=True)
    # qemu-img's own timing of the write loop ("Run completed in 0.123 seconds."), so process start-up
    # and image open are not charged to QEMU.
    match = re.search(r"Run completed in ([0-9.]+) seconds", proc.stdout)
    if not match:
        raise RuntimeError(f"qemu-img bench: no 'Run completed' line in its output: {proc.stdout!r}")
    return float(match.group(1))


def _qemu_version() -> str:
    return subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.splitlines()[0]


# ---- host I/O per allocating write ----------------------------------------------------------------------
def io_costs(n: int) -> dict:
    """Host writes and flushes per steady-state allocating 64 KiB write: qcrash at its block-file seam, QEMU
    through its blklogwrites log, side by side."""
    rows = []
    have_qemu = shutil.which("qemu-io") is not None
    for cache in ("writeback", "writethrough", "directsync"):
        for lazy in (False, True):
            row = {"cache": cache, "lazy_refcounts": lazy, "writes": n, **_qcrash_costs(n, cache, lazy)}
            if have_qemu:
                row.update(_qemu_costs(n, cache, lazy))
            rows.append(row)
    return {"rows": rows, "method": "steady state = (cost of 8+n writes - cost of 8 writes) / n, open and close "
                                    "included in both; qcrash counted at its block-file seam, QEMU from a "
                                    "blklogwrites log"}


def _qcrash_costs(n: int, cache: str, lazy: bool) -> dict:
    short, long_ = _qcrash_counts(8, cache, lazy), _qcrash_counts(8 + n, cache, lazy)
    return {"qcrash_writes_per_write": round((long_[0] - short[0]) / n, 3),
            "qcrash_flushes_per_write": round((long_[1] - short[1]) / n, 3)}


def _qcrash_counts(count: int, cache: str, lazy: bool) -> tuple[int, int]:
    from models.blockio import CountingFile, MemoryFile
    from models.qcow2 import Qcow2Image

    mem = MemoryFile()
    Qcow2Image.create(mem, 1 << 30, lazy_refcounts=lazy)
    counter = CountingFile(mem)
    img = Qcow2Image.open(counter, cache_mode=cache)
    data = b"\x11" * 65536
    for i in range(count):
        img.write(i * 65536, data)
    img.close()
    return len(counter.writes), counter.flushes


def _qemu_costs(n: int, cache: str, lazy: bool) -> dict:
    # Two runs, 8 and 8+n writes: the difference is the steady-state cost (open and close cancel out).
    short, long_ = _qemu_log_counts(8, cache, lazy), _qemu_log_counts(8 + n, cache, lazy)
    return {"qemu_writes_per_write": round((long_[0] - short[0]) / n, 3),
            "qemu_flushes_per_write": round((long_[1] - short[1]) / n, 3)}


def _qemu_log_counts(count: int, cache: str, lazy: bool) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        img, log = Path(tmp) / "b.qcow2", Path(tmp) / "b.log"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"lazy_refcounts={'on' if lazy else 'off'}",
                        str(img), "1G"], check=True)
        log.touch()
        opts = (f"driver=qcow2,file.driver=blklogwrites,file.file.driver=file,file.file.filename={img},"
                f"file.log.driver=file,file.log.filename={log}")
        cmds = []
        for i in range(count):
            cmds += ["-c", f"write -q -P 0x11 {i * 65536} 64k"]
        subprocess.run(["qemu-io", "-t", cache, "--image-opts", opts, *cmds], check=True, capture_output=True)
        entries = parse_blklogwrites(log.read_bytes())
    writes = sum(1 for _o, _l, fl in entries if not fl & 1)
    return writes, len(entries) - writes


def parse_blklogwrites(raw: bytes) -> list[tuple[int, int, int]]:
    """(offset, length, flags) per entry of a dm-log-writes / QEMU blklogwrites log (little-endian)."""
    magic, version, _nr, sectorsize = struct.unpack_from("<QQQI", raw, 0)
    if magic != 0x6A736677736872 or version != 1:
        raise ValueError(f"blklogwrites log: magic {magic:#x} version {version}: not a log (want 0x6a736677736872, 1)")
    out = []
    cur = 1
    while (cur + 1) * sectorsize <= len(raw):
        sector, nsec, flags, dlen = struct.unpack_from("<QQQQ", raw, cur * sectorsize)
        if flags & ~0x1F or (sector == nsec == flags == dlen == 0):
            break
        out.append((sector * sectorsize, nsec * sectorsize, flags))
        cur += 1 + (0 if flags & 4 else nsec)
    return out


def render(r: dict) -> str:
    from harness.bench import judging

    head = ["# qcrash bench", "", f"{'quick' if r['quick'] else 'full'} run, Python {r['python']}, {r['cores']} cores", ""]
    head += judging.render(r["judging"]) + [""]
    if "harness" not in r:
        return "\n".join(head) + "\n"
    lines = head + ["## Harness throughput (default configuration mix, profile dev)", "",
             "| jobs | examples/s | crash states/s | median per-example states/s | states/s per core | scaling vs 1 core | peak worker RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    for row in r["harness"]["rows"]:
        lines.append(f"| {row['jobs']} | {row['examples_per_second']} | {row['crash_states_per_second']} | "
                     f"{row['median_example_states_per_second']} | {row['states_per_second_per_core']} | {row['scaling_vs_1_core']} | {row['peak_worker_rss_mib']} |")
    q = r["qcow2_throughput"]
    lines += ["", f"## qcow2 throughput: qcrash vs qemu-img bench ({q['qemu'] or 'qemu-img missing'})", "",
              "64 KiB allocating writes into a new 4 GiB image, same file system, same run.", "",
              "| cache | lazy | writes | qcrash writes/s | qemu writes/s | ratio (time qcrash/qemu) |", "|---|---|---|---|---|---|"]
    for row in q["rows"]:
        lines.append(f"| {row['cache']} | {row['lazy_refcounts']} | {row['writes']} | {row['qcrash_writes_per_second']} | "
                     f"{row.get('qemu_writes_per_second', '-')} | {row.get('ratio_qcrash_over_qemu', '-')} |")
    c = r["io_cost_per_write"]
    lines += ["", "## Host I/O per steady-state allocating 64 KiB write", "", c["method"], "",
              "| cache | lazy | qcrash writes | qcrash flushes | QEMU writes | QEMU flushes |", "|---|---|---|---|---|---|"]
    for row in c["rows"]:
        lines.append(f"| {row['cache']} | {row['lazy_refcounts']} | {row['qcrash_writes_per_write']} | "
                     f"{row['qcrash_flushes_per_write']} | {row.get('qemu_writes_per_write', '-')} | "
                     f"{row.get('qemu_flushes_per_write', '-')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
