"""`qcrash img snapshot` and the snapshot part of `img info`, in-process: qemu-img 7.2's text (recorded from it), exit codes and messages."""

from __future__ import annotations

import json
import time

import pytest

from harness.cli import main
from harness.cli import snapshot as snapcli
from models.qcow2.snaptable import Snapshot

HEADER = "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, err


def test_dump_matches_qemu_img_columns() -> None:
    sn = Snapshot("1", "first", 0x7000, 2, 1 << 22, date_sec=1796088254, vm_clock_nsec=3_723_456_000_000, icount=0)
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1796088254))
    assert snapcli.dump_header() == HEADER
    assert snapcli.dump_row(sn) == f"1         first                 0 B {date} 01:02:03.456          0"
    assert snapcli.dump_row(Snapshot("12", "x", 0, 0, 0, icount=-1)).endswith("00:00:00.000" + " " * 11)


def test_snapshot_commands_and_info(tmp_path, capsys) -> None:
    img = tmp_path / "s.qcow2"
    assert run(capsys, "img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")[0] == 0
    assert run(capsys, "io", "-c", "write -P 0x11 0 4k", img)[0] == 0
    assert run(capsys, "img", "snapshot", "-l", img) == (0, "", "")
    assert run(capsys, "img", "snapshot", "-c", "one", img)[0] == 0
    assert run(capsys, "io", "-c", "write -P 0x22 0 4k", img)[0] == 0
    rc, out, _ = run(capsys, "img", "snapshot", "-l", img)
    assert rc == 0 and out.splitlines()[:2] == ["Snapshot list:", HEADER] and out.splitlines()[2].startswith("1         one ")
    info = json.loads(run(capsys, "img", "info", "--output", "json", img)[1])
    assert list(info)[0] == "snapshots"
    assert list(info["snapshots"][0]) == ["icount", "vm-clock-nsec", "name", "date-sec", "date-nsec", "vm-clock-sec",
                                          "id", "vm-state-size"]
    human = run(capsys, "img", "info", img)[1]
    assert "cluster_size: 4096\nSnapshot list:\n" + HEADER in human
    assert run(capsys, "img", "snapshot", "-a", "one", img)[0] == 0
    assert "read 4096/4096" in run(capsys, "io", "-c", "read -P 0x11 0 4k", img)[1]
    assert run(capsys, "img", "snapshot", "-d", "one", img)[0] == 0
    assert run(capsys, "img", "snapshot", "-l", img) == (0, "", "")


@pytest.mark.parametrize("args,message", [
    (["-a", "nope"], "qcrash: Could not apply snapshot 'nope': Failed to load snapshot: No such file or directory"),
    (["-d", "nope"], "qcrash: Could not delete snapshot 'nope': snapshot not found"),
    (["-c", "x", "-d", "y"], "qcrash: Cannot mix '-l', '-a', '-c', '-d'"),
])
def test_snapshot_errors(tmp_path, capsys, args, message) -> None:
    img = tmp_path / "e.qcow2"
    run(capsys, "img", "create", "-q", "-f", "qcow2", img, "1M")
    rc, out, err = run(capsys, "img", "snapshot", *args, img)
    assert (rc, out, err.splitlines()[0]) == (1, "", message)


def test_refcount_overflow_fails_like_qemu(tmp_path, capsys) -> None:
    img = tmp_path / "r.qcow2"
    run(capsys, "img", "create", "-q", "-f", "qcow2", "-o", "refcount_bits=1,cluster_size=4096", img, "1M")
    run(capsys, "io", "-c", "write 0 4k", img)
    rc, _out, err = run(capsys, "img", "snapshot", "-c", "s", img)
    assert rc == 1 and err.splitlines()[0] == "qcrash: Could not create snapshot 's': -22 (Invalid argument)"
    assert "refcount" in err.splitlines()[1]
