"""`qcrash img create|info|check` (and the shared conventions of `qcrash io`, in harness/cli/io.py): qemu-img's and qemu-io's command lines and output over the pure-Python qcow2 model, so a user can swap one tool for the other."""

# Conventions (each mirrors QEMU 7.2 unless noted):
#
# - `img create` prints qemu-img's "Formatting '...'" line (options echoed in qemu-img's
#   order and spelling) before it validates the configuration, as qemu-img does.
# - `img info` prints the keys and human lines of `qemu-img info`; "actual-size"/"disk
#   size" come from st_blocks like QEMU's, so they match on the same file.
# - `img check` prints the per-cluster lines on stderr and the summary on stdout and
#   exits 0 clean, 1 check failed, 2 corruptions, 3 leaks only.
# - `io` runs qemu-io's commands in order with cache=writethrough by default and prints
#   qemu-io's two report lines per request, timing included. A failed request prints
#   "qcrash: ..." and the run goes on (exit 1 at the end), as qemu-io does; a failed
#   pattern check prints "Pattern verification failed at offset N, M bytes".
# - `abort` and `sigraise 6` stop at once, without flushing or closing the image, and exit
#   134 (the shell's status for SIGABRT, without the core dump); `sigraise 9` does the same
#   and exits 137 (SIGKILL's status, what the shell reports for `qemu-io -c "sigraise 9"`).
# - Every error prints one `qcrash: <message>` line naming the file and what was wrong and
#   exits non-zero: 1, usage errors included (qemu-img's and qemu-io's status). Never a traceback
#   (an unexpected exception prints "qcrash: internal error: ..." and exits 70; set
#   QCRASH_TRACEBACK=1 to see the traceback).

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

from harness import config, sizes
from harness.cli import UsageError

EXIT_ABORT = 134  # 128 + SIGABRT
EXIT_KILLED = 137  # 128 + SIGKILL
EXIT_INTERNAL = 70  # EX_SOFTWARE




# ---------------------------------------------------------------------------------- parsing
def parse_size(text: str, what: str = "size") -> int:
    """QEMU's qemu_strtosz (harness.sizes), as a usage error for the command line."""
    try:
        return sizes.parse_size(text, what)
    except sizes.SizeError as exc:
        raise UsageError(str(exc)) from None


def parse_bool(text: str, what: str) -> bool:
    """harness.config's on/off parser (QEMU's rules), failing as a usage error."""
    try:
        return config.parse_bool(text, what)
    except config.ConfigError as exc:
        raise UsageError(str(exc)) from None


def parse_opts(text: str, what: str) -> list[tuple[str, str]]:
    """A QemuOpts-style `key=value,key=value` string (a doubled comma is a literal comma)."""
    out: list[tuple[str, str]] = []
    for part in re.split(r"(?<!,),(?!,)", text):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            raise UsageError(f"{what} '{part}': expected key=value")
        out.append((key.strip(), value.replace(",,", ",")))
    return out


def _check_format(fmt: str | None) -> None:
    if fmt is not None and fmt != "qcow2":
        raise UsageError(f"format '{fmt}' is not supported: qcrash only implements qcow2")


def size_to_str(value: int) -> str:
    """QEMU's size_to_str: three significant digits and a binary suffix ("196 KiB", "11.8 MiB", "0 B")."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    _mant, exp = math.frexp(value / (1000.0 / 1024.0))
    i = max(exp - 1, 0) // 10
    return "%0.3g %sB" % (value / (1 << (i * 10)), suffixes[i])


# ---------------------------------------------------------------------------------- errors
class CommandFailed(Exception):
    """An error already worth one `qcrash: <message>` line and exit status 1."""


def _guard(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn every expected error into `qcrash: <message>` and a status; never a traceback."""

    def run(args: argparse.Namespace) -> int:
        from models.qcow2.errors import Qcow2Error

        try:
            return handler(args)
        except UsageError as exc:
            # qemu-img and qemu-io exit 1 on a usage error (not 2 as argparse would).
            _err(f"error: {exc}")
            return 1
        except (CommandFailed, Qcow2Error) as exc:
            _err(str(exc))
            return 1
        except OSError as exc:
            _err(_os_message(exc))
            return 1
        except Exception as exc:  # noqa: BLE001 - the promise is: no traceback
            if os.environ.get("QCRASH_TRACEBACK"):
                raise
            _err(f"internal error: {type(exc).__name__}: {exc} (set QCRASH_TRACEBACK=1 for the traceback)")
            return EXIT_INTERNAL

    return run


def _err(message: str) -> None:
    sys.stdout.flush()
    print(f"qcrash: {message}", file=sys.stderr)
    sys.stderr.flush()


def _os_message(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else ""
    return f"{name}: {exc.strerror or exc}" if name else str(exc)


def _open_file(path: str, *, readonly: bool):
    from models.blockio import OsFile

    if os.path.isdir(path):
        raise CommandFailed(f"{path}: Could not open '{path}': Is a directory")
    try:
        return OsFile(path, readonly=readonly)
    except OSError as exc:
        raise CommandFailed(f"{path}: Could not open '{path}': {exc.strerror}") from None


# ---------------------------------------------------------------------------------- img create
_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_CREATE_KEYS = ("size", "compat", "version", "cluster_size", "refcount_bits", "lazy_refcounts", "extended_l2",
                "compression_type")


@dataclass
class CreateSpec:
    path: str
    size: int
    version: int = 3
    cluster_size: int = 65536
    refcount_bits: int = 16
    lazy_refcounts: bool = False
    raw: dict[str, str] = field(default_factory=dict)

    def formatting_line(self) -> str:
        """qemu-img create's first line: options in QemuOpts order; compat only when given; booleans as typed."""
        parts = [f"Formatting '{self.path}', fmt=qcow2 cluster_size={self.cluster_size}",
                 f"extended_l2={self.raw.get('extended_l2', 'off')}",
                 f"compression_type={self.raw.get('compression_type', 'zlib')}", f"size={self.size}"]
        if "compat" in self.raw:
            parts.append(f"compat={self.raw['compat']}")
        parts.append(f"lazy_refcounts={self.raw.get('lazy_refcounts', 'off')}")
        parts.append(f"refcount_bits={self.refcount_bits}")
        return " ".join(parts)


def create_spec(path: str, size_arg: str | None, options: list[str]) -> CreateSpec:
    """Parse qemu-img create's size and -o options (values only; the rules are checked after the Formatting line)."""
    raw: dict[str, str] = {}
    for text in options:
        for key, value in parse_opts(text, "-o option"):
            if key == "version":
                key = "compat"
            if key not in _CREATE_KEYS:
                known = "compat, cluster_size, refcount_bits, lazy_refcounts, size"
                raise CommandFailed(f"{path}: Invalid parameter '{key}' (qcrash supports {known})")
            raw[key] = value
    if size_arg is not None and "size" in raw:
        raise CommandFailed(f"{path}: The image size must be specified only once")
    if size_arg is None and "size" not in raw:
        raise CommandFailed(f"{path}: Image creation needs a size parameter")
    size = parse_size(size_arg if size_arg is not None else raw["size"], "image size")
    spec = CreateSpec(path, size, raw=raw)
    if "compat" in raw:
        if raw["compat"] not in _COMPAT:
            raise CommandFailed(f"{path}: Parameter 'version' does not accept value '{raw['compat']}' "
                                "(use 0.10, v2, 1.1 or v3)")
        spec.version = _COMPAT[raw["compat"]]
    if "cluster_size" in raw:
        spec.cluster_size = parse_size(raw["cluster_size"], "cluster_size")
    if "refcount_bits" in raw:
        try:
            spec.refcount_bits = int(raw["refcount_bits"], 0)
        except ValueError:
            raise CommandFailed(f"{path}: Parameter 'refcount_bits' expects a number, got '{raw['refcount_bits']}'") from None
    if "lazy_refcounts" in raw:
        spec.lazy_refcounts = parse_bool(raw["lazy_refcounts"], f"{path}: lazy_refcounts")
    if raw.get("extended_l2", "off") not in ("off", "false", "no", "n"):
        raise CommandFailed(f"{path}: extended_l2={raw['extended_l2']}: extended L2 entries are not supported by qcrash")
    if raw.get("compression_type", "zlib") != "zlib":
        raise CommandFailed(f"{path}: compression_type={raw['compression_type']}: only zlib (the default) is supported")
    return spec


def validate_create(spec: CreateSpec) -> None:
    """The rules qemu-img checks after printing the Formatting line, with its messages."""
    cs, rb = spec.cluster_size, spec.refcount_bits
    if cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
        raise CommandFailed(f"{spec.path}: cluster_size = {cs}: Cluster size must be a power of two between 512 and 2048k")
    if rb < 1 or rb > 64 or rb & (rb - 1):
        raise CommandFailed(f"{spec.path}: refcount_bits = {rb}: Refcount width must be a power of two and may not exceed 64 bits")
    if spec.version == 2 and rb != 16:
        raise CommandFailed(f"{spec.path}: refcount_bits = {rb}: Different refcount widths than 16 bits require "
                            "compatibility level 1.1 or above (use version=v3 or greater)")
    if spec.version == 2 and spec.lazy_refcounts:
        raise CommandFailed(f"{spec.path}: lazy_refcounts = on: Lazy refcounts only supported with compatibility "
                            "level 1.1 and above (use version=v3 or greater)")
    l1_bytes = 8 * -(-spec.size // (cs * (cs // 8)))
    if l1_bytes > 32 * 1024 * 1024:
        raise CommandFailed(f"{spec.path}: size = {spec.size}: The image size is too large for file format 'qcow2' "
                            "(try using a larger cluster size)")


def create_image(spec: CreateSpec) -> None:
    from models.blockio import OsFile
    from models.qcow2.image import Qcow2Image

    try:
        f = OsFile(spec.path, create=True)
    except OSError as exc:
        raise CommandFailed(f"{spec.path}: Could not create '{spec.path}': {exc.strerror}") from None
    try:
        Qcow2Image.create(f, spec.size, version=spec.version, cluster_size=spec.cluster_size,
                          refcount_bits=spec.refcount_bits, lazy_refcounts=spec.lazy_refcounts)
    finally:
        f.close()


@_guard
def cmd_create(args: argparse.Namespace) -> int:
    _check_format(args.format)
    spec = create_spec(args.file, args.size, args.options)
    if not args.quiet:
        print(spec.formatting_line(), flush=True)
    validate_create(spec)
    create_image(spec)
    return 0


# ---------------------------------------------------------------------------------- img info
def image_info(path: str) -> dict:
    """The dictionary `qemu-img info --output=json` prints, in its key order."""
    from harness.cli import snapshot as snapcli
    from models.qcow2 import snapshot
    from models.qcow2 import spec as qspec
    from models.qcow2.image import Qcow2Image

    f = _open_file(path, readonly=True)
    try:
        img = Qcow2Image.open(f, readonly=True)
        hdr = img.hdr
        snapshots = snapcli.info_entries(snapshot.list_snapshots(img))
        st = os.fstat(f.fd)
    finally:
        f.close()
    incompat = hdr.incompatible_features
    data: dict[str, object] = {"compat": "1.1" if hdr.version >= 3 else "0.10",
                               "compression-type": "zstd" if hdr.compression_type == 1 else "zlib"}
    if hdr.version >= 3:
        data["lazy-refcounts"] = bool(hdr.compatible_features & qspec.CompatFeature.LAZY_REFCOUNTS)
    data["refcount-bits"] = 1 << hdr.refcount_order
    if hdr.version >= 3:
        data["corrupt"] = bool(incompat & qspec.IncompatFeature.CORRUPT)
        data["extended-l2"] = bool(incompat & qspec.IncompatFeature.EXTENDED_L2)
    return {
        **({"snapshots": snapshots} if snapshots else {}),
        "virtual-size": hdr.size,
        "filename": path,
        "cluster-size": 1 << hdr.cluster_bits,
        "format": "qcow2",
        "actual-size": st.st_blocks * 512,
        "format-specific": {"type": "qcow2", "data": data},
        "dirty-flag": bool(incompat & qspec.IncompatFeature.DIRTY),
    }


def format_info_human(info: dict) -> str:
    lines = [f"image: {info['filename']}", f"file format: {info['format']}",
             f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
             f"disk size: {size_to_str(info['actual-size'])}", f"cluster_size: {info['cluster-size']}"]
    if info["dirty-flag"]:
        lines.append("cleanly shut down: no")
    if info.get("snapshots"):
        from harness.cli import snapshot as snapcli

        lines.append(snapcli.list_text_from_info(info["snapshots"]).rstrip("\n"))
    lines.append("Format specific information:")
    for key, value in info["format-specific"]["data"].items():
        shown = ("true" if value else "false") if isinstance(value, bool) else value
        lines.append(f"    {key.replace('-', ' ')}: {shown}")
    return "\n".join(lines) + "\n"


@_guard
def cmd_info(args: argparse.Namespace) -> int:
    _check_format(args.format)
    info = image_info(args.file)
    if args.output == "json":
        sys.stdout.write(json.dumps(info, indent=4) + "\n")
    else:
        sys.stdout.write(format_info_human(info))
    return 0


# ---------------------------------------------------------------------------------- img check
def _qcrash_prefix(stderr_text: str) -> str:
    """check.py renders qemu-img's own "qemu-img: Check failed" line; qcrash prints it as `qcrash: Check failed`."""
    return "".join("qcrash: " + line[len("qemu-img: "):] if line.startswith("qemu-img: ") else line
                   for line in stderr_text.splitlines(keepends=True))


@_guard
def cmd_check(args: argparse.Namespace) -> int:
    _check_format(args.format)
    try:
        from models.qcow2 import check as checkmod
    except ImportError as exc:
        raise CommandFailed(f"{args.file}: img check needs models.qcow2.check, which cannot be imported ({exc})") from None
    fix = {None: checkmod.Fix.NONE, "leaks": checkmod.Fix.LEAKS, "all": checkmod.Fix.ALL}[args.repair]
    f = _open_file(args.file, readonly=not fix)
    try:
        if fix:
            # check with fix, then clear the dirty/corrupt bits when QEMU would (qcow2_mark_clean).
            result = checkmod.repair(f, fix, path=args.file)
        else:
            result = checkmod.check(f, fix, path=args.file)
    finally:
        f.close()
    if args.output == "json":
        err = checkmod.format_stderr(result)
        out = checkmod.format_json(result, args.file)
    else:
        out, err = checkmod.format_human(result, args.file, bool(fix))
    sys.stderr.write(_qcrash_prefix(err))
    sys.stderr.flush()
    if not args.quiet:
        sys.stdout.write(out)
    return checkmod.exit_code(result)


# ---------------------------------------------------------------------------------- registration
def _install_error(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse errors print `qcrash: error: <message>` (after the usage line) and exit 1, as qemu-img's do."""

    def error(message: str) -> None:
        parser.print_usage(sys.stderr)
        print(f"qcrash: error: {parser.prog}: {message}", file=sys.stderr)
        sys.exit(1)  # qemu-img's and qemu-io's status for a usage error

    parser.error = error  # type: ignore[method-assign]
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    img = _install_error(subparsers.add_parser("img", help="qemu-img work-alike: create, info, check"))
    img_sub = img.add_subparsers(dest="img_command", metavar="SUBCOMMAND", help="create, info or check")

    def img_help(_args: argparse.Namespace) -> int:
        img.print_help(sys.stderr)
        return 1

    img.set_defaults(func=img_help)

    p = _install_error(img_sub.add_parser(
        "create", help="create a qcow2 image (qemu-img create)",
        description="Create a qcow2 image exactly as `qemu-img create -f qcow2` lays it out."))
    p.add_argument("-f", dest="format", default=None, metavar="FMT", help="image format (only qcow2)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="compat=0.10|1.1|v2|v3, cluster_size=SIZE, refcount_bits=N, lazy_refcounts=on|off, size=SIZE")
    p.add_argument("-q", dest="quiet", action="store_true", help="do not print the Formatting line")
    p.add_argument("file", metavar="FILE", help="the image file")
    p.add_argument("size", metavar="SIZE", nargs="?", help="virtual size: bytes or k/M/G/T/P/E suffix")
    p.set_defaults(func=cmd_create)

    p = _install_error(img_sub.add_parser("info", help="describe an image (qemu-img info)"))
    p.add_argument("-f", dest="format", default=None, metavar="FMT", help="image format (only qcow2)")
    p.add_argument("--output", choices=("human", "json"), default="human", help="output format (default human)")
    p.add_argument("file", metavar="FILE", help="the image file")
    p.set_defaults(func=cmd_info)

    p = _install_error(img_sub.add_parser("check", help="check, and with -r repair, an image (qemu-img check)"))
    p.add_argument("-f", dest="format", default=None, metavar="FMT", help="image format (only qcow2)")
    p.add_argument("-r", dest="repair", choices=("leaks", "all"), default=None, help="repair leaks, or all errors")
    p.add_argument("--output", choices=("human", "json"), default="human", help="output format (default human)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet: no summary on stdout")
    p.add_argument("file", metavar="FILE", help="the image file")
    p.set_defaults(func=cmd_check)

    from harness.cli import snapshot as snapcli

    snapcli.register(img_sub, _install_error)

    p = _install_error(subparsers.add_parser(
        "io", help="qemu-io work-alike: run read/write/discard/flush/abort commands on an image",
        description="Run qemu-io commands (write [-P BYTE] [-z] OFF LEN, read [-P BYTE] OFF LEN, discard OFF LEN, "
                    "flush, abort, sigraise 9, reopen -o lazy-refcounts=on|off) in order."))
    p.add_argument("-c", "--cmd", dest="cmd", action="append", default=[], metavar="CMD",
                   help="a qemu-io command; repeat for several, run in order (none: read commands from stdin)")
    p.add_argument("-r", "--read-only", dest="read_only", action="store_true", help="open read-only (no repair)")
    p.add_argument("-t", "--cache", dest="cache", default="writethrough", metavar="MODE",
                   help="writeback | writethrough (default, as qemu-io) | directsync")
    p.add_argument("-o", dest="lazy_option", default=None, metavar="lazy-refcounts=on|off",
                   help="override the header's lazy refcounts setting for this open")
    p.add_argument("-f", "--format", dest="format", default=None, metavar="FMT", help="image format (only qcow2)")
    p.add_argument("file", metavar="FILE", help="the image file")
    from harness.cli.io import cmd_io

    p.set_defaults(func=cmd_io)
