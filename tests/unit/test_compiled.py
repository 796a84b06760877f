"""The compiled plan (guard/policy/compiled.py): a record is read back as the very plan it was
made from, and any change to an input -- a file edited, added, removed or replaced in the
configuration, conf.d, portreserve's directory or the unit search path, another environment --
makes it unusable; a change too close to the read is never recorded."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from guard.fingerprint import VOLATILE_ENV
from guard.kernel import layout
from guard.policy import compiled, config, owners, plan
from guard.policy.units import UNIT_DIRS_ENV

OLD = time.time() - 3600  # an hour ago: nothing racy


@pytest.fixture
def world(tmp_path: Path, monkeypatch):
    """A configuration with a drop-in and portreserve's directory, unit directories of its own
    (one unit declaring a port in a drop-in), every file an hour old."""
    etc = tmp_path / "etc"
    (etc / "conf.d").mkdir(parents=True)
    (etc / "portreserve").mkdir()
    units = tmp_path / "units"
    (units / "web.service.d").mkdir(parents=True)
    (etc / "portguard.toml").write_text(
        f'[guard]\nportreserve_dir = "{etc}/portreserve"\n'
        '[[reserve]]\nports = ["8000/tcp"]\ncgroup = "/app"\n'
    )
    (etc / "conf.d" / "10-more.toml").write_text(
        '[[reserve]]\nports = ["8001"]\nunit = "web.service"\n'
    )
    (etc / "portreserve" / "cups").write_text("631/tcp\n")
    (units / "web.service").write_text("[Service]\nExecStart=/bin/true\n")
    (units / "web.service.d" / "ports.conf").write_text("[Unit]\nX-PortGuard-Reserve=8002\n")
    monkeypatch.setenv(UNIT_DIRS_ENV, str(units))
    age(tmp_path)
    return etc / "portguard.toml"


def age(top: Path) -> None:
    for path in [top, *top.rglob("*")]:
        os.utime(path, (OLD, OLD), follow_symlinks=False)


def applied(main: Path) -> tuple[config.Config, plan.Plan]:
    cfg = config.load(config.config_files(main))
    return cfg, plan.build(cfg.settings, *owners.resolve_all(cfg), layout.LIMITS)


def later() -> int:
    """A read that began well after every change so far (a change's ctime is always now:
    nobody can age that)."""
    return time.time_ns() + 2 * compiled.RACY_NS


def record(main: Path) -> bytes:
    cfg, the_plan = applied(main)
    data = compiled.dumps(cfg, the_plan, main, later())
    assert data is not None
    return data


def test_a_record_gives_back_the_settings_plan_and_unit_file_findings_it_was_made_of(world):
    cfg, the_plan = applied(world)
    data = compiled.dumps(cfg, the_plan, world, later())
    assert compiled.loads(data, world) == (the_plan, cfg.unit_problems, cfg.unit_notes)
    assert the_plan.settings == cfg.settings
    assert {port for _, port in the_plan.origins} == {631, 8000, 8001, 8002}


def test_a_record_of_other_files_is_not_used(world):
    assert compiled.loads(record(world), world.with_name("other.toml")) is None
    assert compiled.loads(b"garbage", world) is None


@pytest.mark.parametrize(
    "change",
    [
        "edit the main file",
        "edit a drop-in",
        "add a drop-in",
        "remove a drop-in",
        "replace a drop-in by another file of the same size",
        "edit a portreserve file",
        "add a unit file",
        "edit a unit's drop-in",
        "add a unit drop-in directory",
        "link a unit name to another file",
        "another unit search path",
        "copy another file over it, keeping the old modification time",
    ],
)
def test_any_change_of_an_input_makes_the_record_unusable(world, change, monkeypatch):
    data = record(world)
    assert compiled.loads(data, world) is not None
    etc, units = world.parent, world.parents[1] / "units"
    if change == "edit the main file":
        world.write_text(world.read_text() + "# edited\n")
    elif change == "edit a drop-in":
        (etc / "conf.d" / "10-more.toml").write_text(
            '[[reserve]]\nports = ["8009"]\ncgroup = "/a"\n'
        )
    elif change == "add a drop-in":
        (etc / "conf.d" / "20-new.toml").write_text("")
    elif change == "remove a drop-in":
        (etc / "conf.d" / "10-more.toml").unlink()
    elif change == "replace a drop-in by another file of the same size":
        old = etc / "conf.d" / "10-more.toml"
        new = old.with_name("new")
        new.write_text(old.read_text().replace("8001", "8003"))
        os.utime(new, (OLD, OLD))
        os.replace(new, old)
        os.utime(old.parent, (OLD, OLD))
    elif change == "edit a portreserve file":
        (etc / "portreserve" / "cups").write_text("632/tcp\n")
    elif change == "add a unit file":
        (units / "other.service").write_text("[Unit]\nX-PortGuard-Reserve=9000\n")
    elif change == "edit a unit's drop-in":
        (units / "web.service.d" / "ports.conf").write_text("[Unit]\nX-PortGuard-Reserve=8004\n")
    elif change == "add a unit drop-in directory":
        (units / "other.service.d").mkdir()
    elif change == "link a unit name to another file":
        (units / "alias.service").symlink_to(units / "web.service")
    elif change == "another unit search path":
        monkeypatch.setenv(UNIT_DIRS_ENV, f"{units}:{etc}")
    elif change == "copy another file over it, keeping the old modification time":
        before = world.stat()
        world.write_text(world.read_text().replace("8000", "8009"))  # cp -p: in place
        os.utime(world, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert (world.stat().st_size, world.stat().st_mtime_ns) == (
            before.st_size,
            before.st_mtime_ns,
        )
    assert compiled.loads(data, world) is None


def test_unchanged_inputs_keep_the_record_usable(world):
    data = record(world)
    (world.parent / "conf.d" / "10-more.toml").read_text()  # reading changes nothing
    assert compiled.loads(data, world) is not None


def test_an_input_changed_as_apply_began_to_read_is_never_recorded(world):
    cfg, the_plan = applied(world)
    (world.parent / "conf.d" / "10-more.toml").write_text("# now\n")
    assert compiled.dumps(cfg, the_plan, world, time.time_ns()) is None
    age(world.parents[1])  # an hour old again, but changed (ctime) just now: still not
    assert compiled.dumps(cfg, the_plan, world, time.time_ns()) is None
    assert compiled.dumps(cfg, the_plan, world, later()) is not None  # read a while after


def test_the_environment_the_record_depends_on_is_the_unit_search_path_override():
    assert compiled.ENVIRONMENT == (UNIT_DIRS_ENV, VOLATILE_ENV)


@pytest.fixture
def volatile(world, monkeypatch) -> Path:
    """A second unit directory that is made anew at every "boot" (as /run/systemd/generator):
    a generated unit and a symlink to a unit of the stable directory."""
    units = world.parents[1] / "units"
    generated = world.parents[1] / "run" / "generator"
    monkeypatch.setenv(VOLATILE_ENV, str(world.parents[1] / "run"))
    monkeypatch.setenv(UNIT_DIRS_ENV, f"{generated}:{units}")
    make_generated(generated, units)
    return generated


def make_generated(generated: Path, units: Path, port: str = "8005") -> None:
    """What a generator writes at boot: new inodes and timestamps every time."""
    if generated.exists():
        for entry in generated.iterdir():
            entry.unlink()
        generated.rmdir()
    generated.mkdir(parents=True)
    (generated / "gen.service").write_text(f"[Unit]\nX-PortGuard-Reserve={port}\n")
    (generated / "alias.service").symlink_to(units / "web.service")
    age(generated.parent)


def test_units_generated_anew_with_the_same_content_keep_the_record(world, volatile):
    data = record(world)
    make_generated(volatile, world.parents[1] / "units")  # the next boot's generators
    known = compiled.loads(data, world)
    assert known is not None and {p for _, p in known.plan.origins} >= {8002, 8005}


@pytest.mark.parametrize("change", ["other content", "another file", "symlink elsewhere"])
def test_units_generated_anew_with_other_content_make_it_unusable(world, volatile, change):
    data = record(world)
    units = world.parents[1] / "units"
    make_generated(volatile, units, port="8006" if change == "other content" else "8005")
    if change == "another file":
        (volatile / "more.service").write_text("[Service]\n")
    elif change == "symlink elsewhere":
        (volatile / "alias.service").unlink()
        (volatile / "alias.service").symlink_to(units / "web.service.d" / "ports.conf")
    assert compiled.loads(data, world) is None


def test_a_unit_masked_by_a_link_to_a_device_is_known_by_that_alone(world, monkeypatch):
    """Debian masks units with links to /dev/null (hwclock.service, rc.service ...). /dev/null
    is made anew at every boot (and by systemd-nspawn at every start): its times must neither
    make every boot's record racy nor every record unusable."""
    units = world.parents[1] / "units"
    device = world.parents[1] / "null"
    try:
        os.mknod(device, 0o666 | 0o020000, os.makedev(1, 3))
    except PermissionError:
        if os.environ.get("CI") == "true":
            pytest.fail("making a device node needs root")
        pytest.skip("making a device node needs root")
    (units / "masked.service").symlink_to(device)
    age(world.parents[1])
    data = record(world)
    time.sleep(1.1)  # every input changed more than a second ago ...
    os.chmod(device, 0o644)  # ... but the device, just now, as at every boot
    assert compiled.loads(data, world) is not None
    cfg, the_plan = applied(world)
    assert compiled.dumps(cfg, the_plan, world, time.time_ns()) is not None  # not racy
    (units / "masked.service").unlink()  # unmasked: another file
    (units / "masked.service").symlink_to(units / "web.service")
    assert compiled.loads(data, world) is None


@pytest.mark.parametrize(
    "change",
    ["none", "edit a unit's drop-in", "add a unit file", "the second name a directory of its own"],
)
def test_one_directory_named_twice_is_read_once_and_any_change_still_counts(
    world, monkeypatch, change
):
    """/lib/systemd/system and /usr/lib/systemd/system are one directory where /usr is merged
    (Debian 12): the second name is known by the directory's device and inode, not by reading
    its ~250 entries again."""
    from guard.fingerprint import fingerprint

    top = world.parents[1]
    units, merged = top / "units", top / "lib"
    merged.symlink_to(top)  # lib/units is units under another name, as /lib is usr/lib
    monkeypatch.setenv(UNIT_DIRS_ENV, f"{units}:{merged / 'units'}")
    seen, _ = fingerprint([], [str(units), str(merged / "units")])
    assert seen and not [item for item in seen if str(item[0]).startswith(f"{merged}/units/")]
    data = record(world)
    if change == "edit a unit's drop-in":
        (units / "web.service.d" / "ports.conf").write_text("[Unit]\nX-PortGuard-Reserve=8004\n")
    elif change == "add a unit file":
        (units / "other.service").write_text("[Unit]\nX-PortGuard-Reserve=9000\n")
    elif change == "the second name a directory of its own":  # the same files, copied
        merged.unlink()
        (merged / "units" / "web.service.d").mkdir(parents=True)
        for name in ("web.service", "web.service.d/ports.conf"):
            (merged / "units" / name).write_text((units / name).read_text())
        age(merged)
    assert (compiled.loads(data, world) is None) == (change != "none")
