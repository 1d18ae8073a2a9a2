"""`qcrash img snapshot -l|-c|-a|-d` and the snapshot part of `img info`: qemu-img 7.2's output, errors and exit codes."""

# What qemu-img 7.2 does, and this mirrors (verified with the Debian build):
#
# - no action: nothing printed, exit 0; two actions: "Cannot mix '-l', '-a', '-c', '-d'", exit 1;
# - -l opens read-only and prints "Snapshot list:", the header line and one row per snapshot,
#   nothing at all when there are none;
# - -c takes the current time (seconds, microseconds * 1000) and a new numeric id; duplicate
#   names are allowed;
# - -a finds the snapshot by id, then by name; failure: "Could not apply snapshot 'X': Failed
#   to load snapshot: No such file or directory", exit 1;
# - -d finds it by name only; failure: "Could not delete snapshot 'X': snapshot not found", exit 1.

from __future__ import annotations

import argparse
import sys
import time

from harness.cli.img import _check_format, _err, _guard, _open_file, size_to_str


def dump_header() -> str:
    """bdrv_snapshot_dump(NULL): the column titles."""
    return "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")


def dump_row(sn) -> str:
    """bdrv_snapshot_dump(sn): one row; the date is local time, as g_date_time_new_from_unix_local."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.date_sec))
    secs = sn.vm_clock_nsec // 1_000_000_000
    clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60, (sn.vm_clock_nsec // 1_000_000) % 1000)
    icount = "" if sn.icount == -1 else str(sn.icount)
    return "%-9s %-16s %8s%20s%13s%11s" % (sn.id_str, sn.name, size_to_str(sn.vm_state_size), date, clock, icount)


def list_text(snapshots) -> str:
    if not snapshots:
        return ""
    return "Snapshot list:\n" + dump_header() + "\n" + "".join(dump_row(sn) + "\n" for sn in snapshots)


def list_text_from_info(entries: list[dict]) -> str:
    """The human snapshot list of `img info`, from its JSON entries."""
    from models.qcow2.snaptable import Snapshot

    return list_text([Snapshot(id_str=e["id"], name=e["name"], l1_table_offset=0, l1_size=0, disk_size=0,
                               date_sec=e["date-sec"], date_nsec=e["date-nsec"],
                               vm_clock_nsec=e["vm-clock-sec"] * 1_000_000_000 + e["vm-clock-nsec"],
                               vm_state_size=e["vm-state-size"], icount=e.get("icount", -1)) for e in entries])


def info_entries(snapshots) -> list[dict]:
    """The "snapshots" array of `qemu-img info --output=json`, each object in QEMU's key order."""
    out = []
    for sn in snapshots:
        entry: dict[str, object] = {}
        if sn.icount != -1:
            entry["icount"] = sn.icount
        entry.update({"vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000, "name": sn.name, "date-sec": sn.date_sec,
                      "date-nsec": sn.date_nsec, "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
                      "id": sn.id_str, "vm-state-size": sn.vm_state_size})
        out.append(entry)
    return out


def read_snapshots(path: str) -> list:
    """The snapshot table of an image, opened read-only."""
    from models.qcow2 import snapshot
    from models.qcow2.image import Qcow2Image

    f = _open_file(path, readonly=True)
    try:
        return snapshot.list_snapshots(Qcow2Image.open(f, readonly=True))
    finally:
        f.close()


@_guard
def cmd_snapshot(args: argparse.Namespace) -> int:
    from models.qcow2 import snapshot
    from models.qcow2.errors import Qcow2Error
    from models.qcow2.image import Qcow2Image

    _check_format(args.format)
    actions = [(flag, value) for flag, value in (("-l", args.list or None), ("-a", args.apply), ("-c", args.create),
                                                  ("-d", args.delete)) if value]
    if len(actions) > 1:
        _err("Cannot mix '-l', '-a', '-c', '-d'")
        print("Try 'qcrash img snapshot --help' for more information", file=sys.stderr)
        return 1
    if not actions:
        return 0
    flag, key = actions[0]
    if flag == "-l":
        sys.stdout.write(list_text(read_snapshots(args.file)))  # qemu-img lists even with -q
        return 0
    f = _open_file(args.file, readonly=False)
    try:
        img = Qcow2Image.open(f)
        try:
            if flag == "-c":
                now = time.time_ns()
                try:
                    snapshot.create(img, key, date_sec=now // 1_000_000_000, date_nsec=now // 1000 % 1_000_000 * 1000)
                except Qcow2Error as exc:
                    _err(f"Could not create snapshot '{key}': -22 (Invalid argument)")
                    _err(str(exc))
                    return 1
            elif flag == "-a":
                try:
                    snapshot.apply(img, key)
                except snapshot.SnapshotNotFound:
                    _err(f"Could not apply snapshot '{key}': Failed to load snapshot: No such file or directory")
                    return 1
            else:
                snapshots = snapshot.list_snapshots(img)
                i = snapshot.find(snapshots, name=key)
                if i < 0:
                    _err(f"Could not delete snapshot '{key}': snapshot not found")
                    return 1
                snapshot.delete(img, id_str=snapshots[i].id_str, name=key)
        finally:
            img.close()
    finally:
        f.close()
    return 0


def register(img_sub: argparse._SubParsersAction, install_error) -> None:
    p = install_error(img_sub.add_parser(
        "snapshot", help="list, create, apply or delete internal snapshots (qemu-img snapshot)",
        description="qemu-img snapshot [-q] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILE"))
    p.add_argument("-f", dest="format", default=None, metavar="FMT", help="image format (only qcow2)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet (accepted, as qemu-img's)")
    p.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    p.add_argument("-a", dest="apply", default=None, metavar="SNAPSHOT", help="revert the disk to a snapshot (id or name)")
    p.add_argument("-c", dest="create", default=None, metavar="SNAPSHOT", help="create a snapshot with this name")
    p.add_argument("-d", dest="delete", default=None, metavar="SNAPSHOT", help="delete the snapshot with this name")
    p.add_argument("file", metavar="FILE", help="the qcow2 image")
    p.set_defaults(func=cmd_snapshot)
