"""qemu-img check's printed output, byte for byte: the human summary, the JSON document, and the stderr lines."""

from __future__ import annotations

import os

from models.qcow2.check.result import CheckResult

__all__ = ["format_stderr", "format_human", "format_json"]


def format_stderr(result: CheckResult) -> str:
    """Everything qemu-img check writes to stderr: the check's lines, then "qemu-img: Check failed..." if it failed."""
    lines = [m + "\n" for m in result.messages]
    if result.error is not None:
        lines.append(f"qemu-img: Check failed: {result.error}\n")
    elif result.check_errors:
        lines.append("qemu-img: Check failed\n")
    return "".join(lines)


def format_human(result: CheckResult, path: str, fixed_requested: bool) -> tuple[str, str]:
    """qemu-img check's human output: (stdout text, stderr text). `path` is unused by the human format."""
    out: list[str] = []
    if fixed_requested and result.double_checked:
        out.append(
            "The following inconsistencies were found and repaired:\n\n"
            f"    {result.leaks_fixed} leaked clusters\n"
            f"    {result.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n"
        )
    if result.error is None:
        if not (result.corruptions or result.leaks or result.check_errors):
            out.append("No errors were found on the image.\n")
        else:
            if result.corruptions:
                out.append(
                    f"\n{result.corruptions} errors were found on the image.\n"
                    "Data may be corrupted, or further writes to the image may corrupt it.\n"
                )
            if result.leaks:
                out.append(
                    f"\n{result.leaks} leaked clusters were found on the image.\n"
                    "This means waste of disk space, but no harm to data.\n"
                )
            if result.check_errors:
                out.append(f"\n{result.check_errors} internal errors have occurred during the check.\n")
        if result.total_clusters and result.allocated_clusters:
            out.append(
                f"{result.allocated_clusters}/{result.total_clusters} = "
                f"{result.allocated_clusters * 100.0 / result.total_clusters:.2f}% allocated, "
                f"{result.fragmented_clusters * 100.0 / result.allocated_clusters:.2f}% fragmented, "
                f"{result.compressed_clusters * 100.0 / result.allocated_clusters:.2f}% compressed clusters\n"
            )
        if result.image_end_offset:
            out.append(f"Image end offset: {result.image_end_offset}\n")
    return "".join(out), format_stderr(result)


def _json_quote(text: str) -> str:
    """QEMU's JSON writer quoting: \\uXXXX (upper case) for everything outside 0x20..0x7e, surrogate pairs past the BMP."""
    out = ['"']
    raw = os.fsencode(text)
    for ch in raw.decode("utf-8", "replace"):
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif cp > 0xFFFF:
            out.append(f"\\u{0xD800 + ((cp - 0x10000) >> 10):04X}\\u{0xDC00 + ((cp - 0x10000) & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


# QEMU prints a QDict, whose iteration order is its hash-bucket order (tdb_hash % 512):
# computed once for these keys, no two share a bucket.
_JSON_ORDER = (
    "image-end-offset",
    "compressed-clusters",
    "total-clusters",
    "corruptions",
    "corruptions-fixed",
    "check-errors",
    "leaks",
    "leaks-fixed",
    "allocated-clusters",
    "filename",
    "format",
    "fragmented-clusters",
)


def format_json(result: CheckResult, path: str) -> str:
    """qemu-img check --output=json's stdout; empty when the check failed (qemu-img prints no JSON then)."""
    if result.error is not None:
        return ""
    values: dict[str, str] = {
        "filename": _json_quote(path),
        "format": '"qcow2"',
        "check-errors": str(result.check_errors),
    }
    optional = {
        "image-end-offset": result.image_end_offset,
        "corruptions": result.corruptions,
        "leaks": result.leaks,
        "corruptions-fixed": result.corruptions_fixed,
        "leaks-fixed": result.leaks_fixed,
        "total-clusters": result.total_clusters,
        "allocated-clusters": result.allocated_clusters,
        "fragmented-clusters": result.fragmented_clusters,
        "compressed-clusters": result.compressed_clusters,
    }
    for key, value in optional.items():
        if value:
            values[key] = str(value)
    body = ",\n".join(f"    {_json_quote(key)}: {values[key]}" for key in _JSON_ORDER if key in values)
    return "{\n" + body + "\n}\n"
