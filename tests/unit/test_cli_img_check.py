"""`qcrash img check` run in-process: clean, dirty and leaking images, repair with `-r all` and `-r leaks`, qemu-img's split stdout/stderr text, JSON and exit codes."""

from __future__ import annotations

import json
import struct

from tests.unit._cli_img_tools import create, dirty_bit, lines, run


def test_check_clean_image(capsys, img):
    create(img, "128M")
    rc, out, err = run(capsys, "img", "check", img)
    assert (rc, err) == (0, "")
    assert out == "No errors were found on the image.\nImage end offset: 262144\n"


def test_check_dirty_image_exit_2_split_output(capsys, img):
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    run(capsys, "io", "-c", "write -P 0x5a 0 512", "-c", "sigraise 9", img)
    rc, out, err = run(capsys, "img", "check", img)
    assert rc == 2
    assert err == ("ERROR cluster 5 refcount=0 reference=1\n"
                   "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0\n")
    assert out == ("\n2 errors were found on the image.\nData may be corrupted, or further writes to the image may "
                   "corrupt it.\n1/2048 = 0.05% allocated, 0.00% fragmented, 0.00% compressed clusters\n"
                   "Image end offset: 393216\n")
    rc, out, err = run(capsys, "img", "check", "--output", "json", img)
    assert rc == 2 and json.loads(out) == {"image-end-offset": 393216, "total-clusters": 2048, "corruptions": 2,
                                           "check-errors": 0, "allocated-clusters": 1, "filename": str(img),
                                           "format": "qcow2"}
    assert dirty_bit(img)


def test_check_repair_all(capsys, img):
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    run(capsys, "io", "-c", "write -P 0x5a 0 512", "-c", "sigraise 9", img)
    rc, out, err = run(capsys, "img", "check", "-r", "all", img)
    assert rc == 0
    assert lines(err) == ["ERROR cluster 5 refcount=0 reference=1", "Rebuilding refcount structure",
                          "Repairing cluster 1 refcount=1 reference=0", "Repairing cluster 2 refcount=1 reference=0"]
    assert out == ("The following inconsistencies were found and repaired:\n\n    0 leaked clusters\n    1 corruptions\n\n"
                   "Double checking the fixed image now...\nNo errors were found on the image.\n"
                   "1/2048 = 0.05% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 524288\n")
    assert not dirty_bit(img)
    assert run(capsys, "io", "-r", "-c", "read -P 0x5a 0 512", img)[0] == 0


def test_check_repair_leaks_cannot_rebuild(capsys, img):
    create(img, "128M", "compat=1.1,lazy_refcounts=on")
    run(capsys, "io", "-c", "write -P 0x5a 0 512", "-c", "abort", img)
    rc, out, err = run(capsys, "img", "check", "-r", "leaks", img)
    assert rc == 1 and out == ""
    assert lines(err) == ["ERROR cluster 5 refcount=0 reference=1", "ERROR need to rebuild refcount structures",
                          "qcrash: Check failed: Input/output error"]
    assert dirty_bit(img), "a failed repair must leave the image dirty"


def test_check_leak_exit_3_and_repair(capsys, img):
    create(img, "128M")
    run(capsys, "io", "-c", "write 0 512", img)
    data = bytearray(img.read_bytes())
    struct.pack_into(">Q", data, 0x40000, 0)  # drop the L2 entry: cluster 5 leaks
    img.write_bytes(bytes(data))
    rc, out, err = run(capsys, "img", "check", img)
    assert rc == 3 and err == "Leaked cluster 5 refcount=1 reference=0\n"
    assert "1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data." in out
    rc, out, err = run(capsys, "img", "check", "-r", "leaks", "--output=json", img)
    assert rc == 0 and json.loads(out)["leaks-fixed"] == 1
    assert err == "Leaked cluster 5 refcount=1 reference=0\nRepairing cluster 5 refcount=1 reference=0\n"
    assert run(capsys, "img", "check", img)[0] == 0


def test_check_open_errors(capsys, tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(bytes(100))
    rc, out, err = run(capsys, "img", "check", bad)
    assert rc == 1 and out == "" and err.startswith(f"qcrash: {bad} at offset 0x0: magic = 0x0")
    rc, out, err = run(capsys, "img", "check", tmp_path / "none.qcow2")
    assert rc == 1 and "Could not open" in err
