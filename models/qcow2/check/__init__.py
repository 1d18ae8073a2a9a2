"""qcow2 consistency check and repair that computes, prints and repairs exactly what QEMU 7.2's `qemu-img check [-r leaks|all]` does.

The package follows QEMU's split (read block/qcow2-refcount.c alongside):

- result: the fix mode, the printed lines as data, the counters, the exit status;
- imrt: the in-memory refcount table and the decoding of on-disk refcount blocks;
- state: the opened image the check runs on (tables, refcount-block cache, corruption events);
- overlap: the metadata overlap guard on the check's own writes;
- refcounts: the port of qcow2_check_refcounts and its helpers, under QEMU's names;
- rebuild: rebuild_refcount_structure, made crash-safe;
- driver: check / repair / double check and the dirty and corrupt bits;
- output: qemu-img's human, JSON and stderr output, byte for byte;
- pasteof: qcrash's deviation at the end of the file.
"""

from models.qcow2.check.driver import MAX_REPAIR_GROWTH, check, clear_dirty_bit, mark_clean_if_repaired, repair
from models.qcow2.check.output import format_human, format_json, format_stderr
from models.qcow2.check.pasteof import drop_refcounts_past_eof, refcounts_past_eof
from models.qcow2.check.result import CheckCounts, CheckResult, Finding, Fix, Kind, Lines, exit_code

__all__ = [
    "MAX_REPAIR_GROWTH",
    "CheckCounts",
    "CheckResult",
    "Finding",
    "Fix",
    "Kind",
    "Lines",
    "check",
    "clear_dirty_bit",
    "drop_refcounts_past_eof",
    "exit_code",
    "format_human",
    "format_json",
    "format_stderr",
    "mark_clean_if_repaired",
    "refcounts_past_eof",
    "repair",
]
