"""Unit tests for models.qcow2.check's report: exit codes, qemu-img's human text and its JSON key order."""

from __future__ import annotations

from models.qcow2.check import CheckResult, exit_code, format_human, format_json


def test_exit_codes_and_human_output() -> None:
    r = CheckResult(total_clusters=2048, allocated_clusters=1, image_end_offset=393216, corruptions=2)
    assert exit_code(r) == 2
    out, err = format_human(r, "t.qcow2", False)
    assert out == (
        "\n2 errors were found on the image.\n"
        "Data may be corrupted, or further writes to the image may corrupt it.\n"
        "1/2048 = 0.05% allocated, 0.00% fragmented, 0.00% compressed clusters\n"
        "Image end offset: 393216\n"
    )
    assert err == ""
    assert exit_code(CheckResult(leaks=1)) == 3
    assert exit_code(CheckResult(leaks=1, check_errors=1)) == 1
    assert exit_code(CheckResult(error="Input/output error")) == 1
    assert exit_code(CheckResult(leaks_fixed=4)) == 0
    out, err = format_human(CheckResult(check_errors=2, image_end_offset=512), "x", False)
    assert out == "\n2 internal errors have occurred during the check.\nImage end offset: 512\n"
    assert err == "qemu-img: Check failed\n"


def test_json_key_order_and_omitted_fields() -> None:
    r = CheckResult(
        image_end_offset=1, total_clusters=2, corruptions=3, leaks=4, corruptions_fixed=5, leaks_fixed=6,
        allocated_clusters=7, fragmented_clusters=8, compressed_clusters=9,
    )
    text = format_json(r, 'a"b\\/é\t\U0001f600')
    assert text == (
        "{\n"
        '    "image-end-offset": 1,\n'
        '    "compressed-clusters": 9,\n'
        '    "total-clusters": 2,\n'
        '    "corruptions": 3,\n'
        '    "corruptions-fixed": 5,\n'
        '    "check-errors": 0,\n'
        '    "leaks": 4,\n'
        '    "leaks-fixed": 6,\n'
        '    "allocated-clusters": 7,\n'
        '    "filename": "a\\"b\\\\/\\u00E9\\t\\uD83D\\uDE00",\n'
        '    "format": "qcow2",\n'
        '    "fragmented-clusters": 8\n'
        "}\n"
    )
    assert format_json(CheckResult(), "f") == '{\n    "check-errors": 0,\n    "filename": "f",\n    "format": "qcow2"\n}\n'
