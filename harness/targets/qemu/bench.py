"""Crash states judged per second per core, by target, over the same seeded examples (the figure `qcrash bench --targets` prints)."""

from __future__ import annotations

import os
import random
import time

from harness.config import draw_config
from harness.ops import random_ops

__all__ = ["states_per_second", "format_rows", "compare_targets"]


def _cpu() -> float:
    # Our process and every finished child (qemu-img, qemu-io): the cores the judging used.
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def states_per_second(target: str, *, seconds: float, seed: int = 1, virtual_size: int = 1 << 20,
                      target_options: dict | None = None) -> dict:
    """Run seeded examples on `target` until `seconds` pass; crash states judged per wall second and per CPU second."""
    from harness.runner import Budget, Runner
    from harness.targets import get_target

    wall0, cpu0 = time.perf_counter(), _cpu()
    states = examples = findings = 0
    while time.perf_counter() - wall0 < seconds:
        rng = random.Random(f"qcrash-bench:{seed}:{examples}")
        config = draw_config(rng, {"virtual_size": virtual_size})
        ops = random_ops(rng, config, rng.randint(3, 10))
        impl = get_target(target, **(target_options or {}))
        runner = Runner(config, seed=examples, budget=Budget(), target=impl)
        try:
            findings += len(runner.run(ops))
        finally:
            impl.abort()
            stop = getattr(impl, "judge", None)
            if stop is not None and hasattr(stop, "stop"):
                stop.stop()  # end the long-lived qemu-io now, so its CPU time is counted as a child's
        states += runner.stats.crash_states
        examples += 1
    wall, cpu = time.perf_counter() - wall0, _cpu() - cpu0
    return {"target": target, "examples": examples, "states": states, "findings": findings,
            "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "states_per_s": round(states / wall, 1), "states_per_cpu_s": round(states / cpu, 1) if cpu else None}


def format_rows(rows: list[dict]) -> str:
    head = "| target | examples | crash states | wall s | CPU s | states/s | states/s/core |\n|---|---|---|---|---|---|---|"
    body = [f"| {r['target']} | {r['examples']} | {r['states']} | {r['seconds']} | {r['cpu_seconds']} | "
            f"{r['states_per_s']} | {r['states_per_cpu_s']} |" for r in rows]
    return "\n".join([head, *body])


def compare_targets(target: str, *, seconds: float, qemu_img: str | None = None, qemu_io: str | None = None,
                    out=None, seed: int = 1):
    """`qcrash bench --target T`: the python target and T on the same seeded examples; writes targets.md and prints it."""
    import json
    from datetime import datetime, timezone
    from pathlib import Path

    from harness.targets.qemu.spec import TargetSpec

    rows = [states_per_second("python", seconds=seconds, seed=seed)]
    version = ""
    if target != "python":
        spec = TargetSpec(target, qemu_img, qemu_io).resolved()  # QemuMissing before any work
        version = spec.version or ""
        rows.append(states_per_second(target, seconds=seconds, seed=seed,
                                      target_options={"qemu_img": spec.qemu_img, "qemu_io": spec.qemu_io}))
    out = Path(out) if out else Path("reports") / f"bench-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    out.mkdir(parents=True, exist_ok=True)
    table = format_rows(rows)
    text = (f"# Crash states judged per second, by target\n\n{seconds:g} s per target, seed {seed}, 1 MiB disks, "
            f"default budget; per core = crash states / CPU seconds of qcrash and every QEMU process it ran."
            f"{f' QEMU {version}.' if version else ''}\n\n{table}\n")
    (out / "targets.md").write_text(text)
    (out / "targets.json").write_text(json.dumps({"rows": rows, "qemu_version": version}, indent=1) + "\n")
    print(table)
    return out / "targets.md"
