"""The target seam on the python target: the live image and its log, judging of image bytes, recovery, and the registry."""

from __future__ import annotations

import pytest

from harness.config import Config
from harness.faultfile import HostOpKind
from harness.targets import RecoveryPath, Target, TargetError, UnknownTarget, get_target, register_target, target_names
from harness.targets.python import PythonTarget

SMALL = dict(cluster_size=512, virtual_size=1 << 20)


def live(**config) -> Target:
    target = get_target("python")
    target.create(Config(**{**SMALL, **config}))
    return target


def dirty_crash_image() -> bytes:
    """A lazy-refcounts image caught mid-run: dirty bit set, refcounts behind the L2 tables."""
    target = live(lazy_refcounts=True)
    target.write(0, b"a" * 1024)
    target.write(4096, b"b" * 512)
    target.flush()
    raw = target.contents()
    assert target.inspect(raw).dirty
    return raw


def test_registry_gives_the_python_target_and_rejects_an_unknown_name() -> None:
    assert isinstance(get_target("python"), PythonTarget)
    assert {"python", "qemu"} <= set(target_names())
    with pytest.raises(UnknownTarget, match=r"target = 'bochs': unknown implementation under test; choose one of "
                                            r"'python', 'qemu'"):
        get_target("bochs")


def test_registry_names_a_target_whose_module_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness import targets

    monkeypatch.setitem(targets._REGISTRY, "ghost", "harness.targets.no_such_module:Ghost")
    with pytest.raises(TargetError, match=r"target = 'ghost': harness.targets.no_such_module:Ghost is not available"):
        get_target("ghost")


def test_registered_factory_gets_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness import targets

    monkeypatch.setattr(targets, "_REGISTRY", dict(targets._REGISTRY))
    seen = {}

    def factory(**options):
        seen.update(options)
        return PythonTarget()

    register_target("custom", factory)
    assert isinstance(get_target("custom", binary="/x"), PythonTarget) and seen == {"binary": "/x"}


def test_guest_ops_advance_the_log_and_points() -> None:
    target = live(cache_mode="writethrough")
    assert target.point() == 0 and len(target.log) == 0
    target.write(0, b"x" * 512)
    after_write = target.point()
    assert after_write > 0 and target.log is target.log, "one log object, appended to"
    assert any(op.kind is HostOpKind.FLUSH for op in target.log), "writethrough flushes every write"
    target.write_zeroes(512, 512)
    target.discard(0, 512)
    assert target.point() > after_write
    assert target.read(0, 1024) == bytes(1024)
    target.reopen("writeback", True)
    assert target.options.cache_mode == "writeback" and target.options.lazy_refcounts is True
    target.close()
    raw = target.contents()
    assert not target.inspect(raw).dirty and not target.check(raw).problems


def test_live_check_and_repair_of_a_healthy_image_are_clean() -> None:
    target = live(lazy_refcounts=True)
    target.write(0, b"x" * 2048)
    assert not target.live_check().problems
    repaired = target.live_repair("all")
    assert not repaired.problems and not repaired.corruptions_fixed
    assert target.read(0, 2048) == b"x" * 2048, "the image is open again after the repair"


def test_inspect_names_an_unopenable_image() -> None:
    info = get_target("python").inspect(b"QFI\xfb" + bytes(10))
    assert info.error is not None and "too short" in info.error


def leaky_crash_image() -> bytes:
    """An eager-refcounts image crashed after the refcount update of a new cluster, before its L2 entry: leaks only."""
    from harness.crashstates import CrashImageBuilder, Policy, enumerate_states

    target = live(lazy_refcounts=False)
    target.write(0, b"a" * 512)
    target.flush()
    log = target.log
    builder = CrashImageBuilder(log)
    for point in range(len(log) + 1):
        for state in enumerate_states(log, point, Policy.PREFIX):
            raw = bytes(builder.build(state))
            result = target.check(raw)
            if result.leaks and not result.corruptions and not result.check_errors:
                return raw
    raise AssertionError("no prefix of an eager allocating write leaks: the write order changed")


@pytest.mark.parametrize("path", [RecoveryPath.OPEN, RecoveryPath.CHECK_ALL])
def test_recovering_a_dirty_crash_image_gives_a_clean_image_with_the_same_data(path: RecoveryPath) -> None:
    raw = dirty_crash_image()
    target = get_target("python")
    before = target.read_only(raw, range(0, 16))
    assert before.changed is None and before.error is None
    assert before.allocated, "the written clusters are reported as allocated"
    rec = target.recover(raw, path, target.options)
    assert rec.error is None and rec.image is not None
    assert not target.inspect(rec.image).dirty
    result = target.check(rec.image, past_eof=True)
    assert not result.problems and result.refcounts_past_eof == ()
    after = target.read_only(rec.image, range(0, 16))
    assert after.sectors == before.sectors
    assert after.sectors[0] == b"a" * 512 and after.sectors[8] == b"b" * 512
    assert rec.log is not None and len(rec.log) > 0, "the recovery wrote (the dirty bit, at least) and was recorded"
    assert target.recover(raw, path, target.options, record=False).log is None


def test_check_leaks_refuses_a_dirty_image_that_needs_a_rebuild_and_fixes_a_leaky_one() -> None:
    # As in QEMU: `check -r leaks` does not rebuild refcounts ("ERROR need to rebuild
    # refcount structures", check failed), so it is no recovery for a lazy-refcounts crash.
    target = get_target("python")
    failed = target.recover(dirty_crash_image(), RecoveryPath.CHECK_LEAKS, target.options)
    assert failed.image is None and failed.error is not None and "check -r failed" in failed.error
    assert any("need to rebuild" in m for m in failed.messages)
    raw = leaky_crash_image()
    rec = target.recover(raw, RecoveryPath.CHECK_LEAKS, target.options)
    assert rec.error is None and rec.image is not None
    assert not target.check(rec.image).problems


def test_read_only_reports_a_write_as_a_change_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from models.qcow2.image import Qcow2Image

    raw = dirty_crash_image()
    original = Qcow2Image.open

    def writing_open(file, **kwargs):
        file.pwrite(0, b"Q")  # a read-only open that touches the header
        return original(file, **kwargs)

    monkeypatch.setattr(Qcow2Image, "open", writing_open)
    view = get_target("python").read_only(raw, [0])
    assert view.changed is not None and "read-only open wrote 1 bytes at 0x0" in view.changed
    assert view.sectors == {}


def test_restart_continues_on_given_bytes_with_a_fresh_log() -> None:
    raw = dirty_crash_image()
    target = get_target("python")
    rec = target.recover(raw, RecoveryPath.OPEN, target.options)
    target = live()
    target.write(0, b"z" * 512)
    target.abort()
    assert rec.image is not None
    target.restart(rec.image)
    assert target.point() == 0 and target.log.base == rec.image
    # The log starts from the judged image itself, not a copy of the live buffer (a 2 MiB-cluster
    # example held one more image for the rest of its run), and the live writes never reach it.
    assert target.log.base is rec.image
    kept = bytes(rec.image)
    target.write(0, b"y" * 512)
    assert target.read(0, 512) == b"y" * 512 and target.log.base == kept and target.point() > 0


# ---- internal snapshots through the seam (issue 16) --------------------------------------------
def test_python_target_snapshot_ops_and_the_snapshot_reader() -> None:
    target = live(cache_mode="writethrough")
    target.write(0, b"a" * 512)
    start = target.point()
    assert target.snapshot_create("s0", date_sec=1) == ("refcount above 1 reached",), "the data cluster is shared now"
    assert target.point() > start, "create writes through the logged file (crash points)"
    target.write(0, b"b" * 512)
    target.snapshot_apply("s0")
    assert target.read(0, 512) == b"a" * 512
    target.snapshot_create("s1")
    target.snapshot_delete("s0")
    target.close()
    reader = target.snapshots(target.contents())
    assert reader.names == ("s1",) and reader.cluster_size == 512
    assert reader.read("s1", 0, 512) == b"a" * 512


def test_a_snapshot_readers_image_is_released_when_the_last_of_its_functions_goes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The reader keeps an image open; an open image sits in reference cycles that only the
    # collector frees, with the image bytes under it. Once the reader and any copy of it
    # (the judge's memo replaces its read_many) are gone, the image is released at once.
    import dataclasses
    import gc

    from models.qcow2.image import Qcow2Image

    released: list[int] = []
    release = Qcow2Image.release
    monkeypatch.setattr(Qcow2Image, "release", lambda self: released.append(1) or release(self))
    target = live(cache_mode="writethrough")
    target.write(0, b"a" * 512)
    target.snapshot_create("s0", date_sec=1)
    target.close()
    released.clear()  # (creating the image released the one that laid it out)
    gc.disable()  # (the release must come from reference counting, not from a collection)
    try:
        reader = target.snapshots(target.contents())
        copy = dataclasses.replace(reader, read_many=None)
        del reader
        assert not released, "the image was released while a copy of its reader could still read it"
        assert copy.read("s0", 0, 512) == b"a" * 512
        del copy
        assert released == [1], "the reader's image was left to the cyclic collector"
    finally:
        gc.enable()


def test_python_target_refuses_a_refcount_overflow_before_writing() -> None:
    from harness.targets import SnapshotRefused

    target = live(refcount_bits=1)
    target.write(0, b"a" * 512)
    start = target.point()
    with pytest.raises(SnapshotRefused, match="refcount"):
        target.snapshot_create("s0")
    assert target.point() == start


def test_a_target_without_snapshots_refuses_them_by_name() -> None:
    class Bare(PythonTarget):
        name = "bare"
        snapshot_create = Target.snapshot_create
        snapshots = Target.snapshots

    target = Bare()
    target.create(Config(**SMALL))
    with pytest.raises(TargetError, match="snapshot create is not supported by the bare target"):
        target.snapshot_create("s0")
    with pytest.raises(TargetError, match="not supported by the bare target"):
        target.snapshots(target.contents())


def test_an_examples_images_leave_no_reference_cycles_behind() -> None:
    # An open image sits in reference cycles (its caches and I/O helpers call back into it),
    # and holds its file: with 2 MiB clusters tens of MiB that only the cyclic collector would
    # free. A whole example (create, writes, a crash and a restart, the final judging) and then
    # the engine's release of its target must leave no image and no image file to the collector.
    import gc

    from harness.config import Config
    from harness.ops import Crash, Flush, Write
    from harness.runner import Runner
    from harness.targets.qemu.spec import release
    from models.blockio import MemoryFile
    from models.qcow2.image import Qcow2Image

    config = Config(cluster_size=65536, lazy_refcounts=True, cache_mode="writethrough")
    ops = [Write(0, 4096, 1), Flush(), Write(65536, 512, 2), Crash(), Write(131072, 512, 3), Flush()]
    gc.collect()
    gc.disable()
    try:
        runner = Runner(config, seed=3)
        assert not runner.run(ops)
        release(runner.target)
        del runner
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, (Qcow2Image, MemoryFile))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not left, f"left to the cyclic collector: {left}"
