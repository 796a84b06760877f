"""X-PortGuard-Reserve= in unit files and drop-ins (guard/policy/declared.py), read from unit
directories built in tmp_path: search-path order, drop-in override and reset, templates,
aliases, masked units, bad values."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guard.policy import config, declared, owners, plan
from guard.policy.ports import Services

LIMITS = plan.Limits(owners_per_port=64, owner_paths=1024, owner_sets=1024)


@pytest.fixture
def tree(tmp_path):
    """/etc, /run and /lib unit directories (highest priority first) and a services file."""
    dirs = [tmp_path / "etc", tmp_path / "run", tmp_path / "lib"]
    for directory in dirs:
        directory.mkdir()
    services = tmp_path / "services"
    services.write_text("ipp\t\t631/tcp\nipp\t\t631/udp\nrsync\t\t873/tcp\n")
    return dirs, Services(services)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def ports_of(found: declared.Declarations) -> dict[str, list[str]]:
    """owner name -> the declared ports, as written back (631 for tcp+udp, 631/udp, ...)."""
    return {
        block.owners[0].name: [str(port_range) for port_range, _ in block.ports]
        for block in found.blocks
    }


def test_a_drop_in_reserves_its_units_ports_with_file_and_line(tree):
    (etc, _, lib), services = tree
    write(lib / "cups.service", "[Unit]\nDescription=CUPS\n[Service]\nExecStart=/bin/true\n")
    dropin = write(
        etc / "cups.service.d" / "portguard.conf",
        "# reserve IPP\n[Unit]\nX-PortGuard-Reserve=ipp\nX-PortGuard-Reserve=8631/tcp 9100-9102\n",
    )
    found = declared.read(tree[0], services)
    assert ports_of(found) == {"cups.service": ["631", "8631/tcp", "9100-9102"]}
    (block,) = found.blocks
    assert [str(origin) for _, origin in block.ports] == [
        f"{dropin}:3",
        f"{dropin}:4",
        f"{dropin}:4",
    ]
    assert block.owners[0].kind == "unit" and str(block.owners[0].origin) == f"{dropin}:3"
    assert found.problems == () and found.notes == ()


def test_drop_ins_apply_after_the_unit_file_and_an_empty_assignment_resets(tree):
    (etc, run, lib), services = tree
    write(lib / "rsync.service", "[Unit]\nX-PortGuard-Reserve=rsync 874\n")
    write(lib / "rsync.service.d" / "10-more.conf", "[Unit]\nX-PortGuard-Reserve=875\n")
    assert ports_of(declared.read(tree[0], services)) == {"rsync.service": ["873", "874", "875"]}
    write(
        etc / "rsync.service.d" / "20-only.conf",
        "[Unit]\nX-PortGuard-Reserve=\nX-PortGuard-Reserve=876\n",
    )
    assert ports_of(declared.read(tree[0], services)) == {"rsync.service": ["876"]}
    write(run / "rsync.service.d" / "30-none.conf", "[Unit]\nX-PortGuard-Reserve=\n")
    assert ports_of(declared.read(tree[0], services)) == {}


def test_a_drop_in_of_the_same_name_higher_in_the_search_path_hides_the_lower_one(tree):
    (etc, _, lib), services = tree
    write(lib / "cups.service", "[Service]\nExecStart=/bin/true\n")
    write(lib / "cups.service.d" / "ports.conf", "[Unit]\nX-PortGuard-Reserve=631\n")
    write(etc / "cups.service.d" / "ports.conf", "[Unit]\nX-PortGuard-Reserve=632\n")
    assert ports_of(declared.read(tree[0], services)) == {"cups.service": ["632"]}


def test_a_unit_file_higher_in_the_search_path_replaces_the_lower_one_with_its_key(tree):
    (etc, _, lib), services = tree
    write(lib / "foo.service", "[Unit]\nX-PortGuard-Reserve=700\n")
    write(etc / "foo.service", "[Unit]\nDescription=local copy without the key\n")
    assert ports_of(declared.read(tree[0], services)) == {}


def test_a_template_reserves_for_all_its_instances_and_an_instance_drop_in_for_itself(tree):
    (etc, _, lib), services = tree
    write(lib / "openvpn@.service", "[Unit]\nX-PortGuard-Reserve=1194/udp\n[Service]\n")
    write(etc / "openvpn@office.service.d" / "port.conf", "[Unit]\nX-PortGuard-Reserve=1195/udp\n")
    found = declared.read(tree[0], services)
    by_owner = {
        (b.owners[0].kind, b.owners[0].name): [str(p) for p, _ in b.ports] for b in found.blocks
    }
    assert by_owner == {
        ("slice", "system-openvpn.slice"): ["1194/udp"],
        ("unit", "openvpn@office.service"): ["1194/udp", "1195/udp"],
    }


def test_a_template_whose_slice_depends_on_the_instance_is_a_problem_not_a_guess(tree):
    (_, _, lib), services = tree
    write(
        lib / "vpn@.service",
        "[Unit]\nX-PortGuard-Reserve=1194/udp\n[Service]\nSlice=vpn-%i.slice\n",
    )
    found = declared.read(tree[0], services)
    assert found.blocks == ()
    assert "differs per instance" in found.problems[0] and "vpn@.service" in found.problems[0]


def test_a_masked_unit_declares_nothing_and_a_note_says_so(tree):
    (etc, _, lib), services = tree
    write(lib / "cups.service", "[Unit]\nX-PortGuard-Reserve=631\n")
    os.symlink("/dev/null", etc / "cups.service")
    found = declared.read(tree[0], services)
    assert found.blocks == () and found.problems == ()
    assert any("cups.service is masked" in note for note in found.notes)


def test_an_alias_is_read_once_as_its_primary_unit(tree):
    (etc, _, lib), services = tree
    write(lib / "ssh.service", "[Unit]\nX-PortGuard-Reserve=22/tcp\n")
    os.symlink(lib / "ssh.service", etc / "sshd.service")
    assert ports_of(declared.read(tree[0], services)) == {"ssh.service": ["22/tcp"]}


def test_a_bad_value_leaves_out_that_whole_unit_only_and_names_file_and_line(tree):
    (etc, _, lib), services = tree
    write(lib / "cups.service", "[Unit]\nX-PortGuard-Reserve=631\n")
    bad = write(
        etc / "cups.service.d" / "typo.conf", "[Unit]\n\nX-PortGuard-Reserve=632 ipps-typo\n"
    )
    write(lib / "rsync.service", "[Unit]\nX-PortGuard-Reserve=873/tcp\n")
    found = declared.read(tree[0], services)
    assert ports_of(found) == {"rsync.service": ["873/tcp"]}
    (problem,) = found.problems
    assert problem.startswith(f"{bad}:3: X-PortGuard-Reserve=ipps-typo: ")
    assert "nothing of cups.service's X-PortGuard-Reserve= is reserved" in problem


def test_the_key_outside_unit_is_a_note_and_not_applied(tree):
    (_, _, lib), services = tree
    path = write(lib / "cups.service", "[Unit]\n[Service]\nX-PortGuard-Reserve=631\n")
    found = declared.read(tree[0], services)
    assert found.blocks == ()
    assert found.notes == (
        f"{path}:3: X-PortGuard-Reserve= is read in [Unit] only, not in [Service]",
    )


def test_drop_in_directories_shared_by_many_units_are_not_read(tree):
    (etc, _, lib), services = tree
    write(etc / "service.d" / "all.conf", "[Unit]\nX-PortGuard-Reserve=631\n")
    write(etc / "foo-.service.d" / "all.conf", "[Unit]\nX-PortGuard-Reserve=632\n")
    found = declared.read(tree[0], services)
    assert found.blocks == () and len(found.notes) == 2
    assert all("shared by several units" in note for note in found.notes)
    # nor for a unit that declares ports of its own and would get them from systemd
    write(lib / "foo-bar.service", "[Unit]\nX-PortGuard-Reserve=700\n")
    assert ports_of(declared.read(tree[0], services)) == {"foo-bar.service": ["700"]}


def test_continuation_lines_and_comments_are_read_as_systemd_reads_them(tree):
    (_, _, lib), services = tree
    path = write(
        lib / "multi.service",
        "[Unit]\n# X-PortGuard-Reserve=1\n; X-PortGuard-Reserve=2\n"
        "X-PortGuard-Reserve=700 \\\n  701\n",
    )
    found = declared.read(tree[0], services)
    assert ports_of(found) == {"multi.service": ["700", "701"]}
    assert {str(o) for _, o in found.blocks[0].ports} == {f"{path}:4"}


def test_a_socket_unit_declares_for_itself_and_its_service(tree, monkeypatch):
    (_, _, lib), services = tree
    write(lib / "cups.socket", "[Unit]\nX-PortGuard-Reserve=631/tcp\n[Socket]\nListenStream=631\n")
    write(lib / "cups.service", "[Service]\nExecStart=/bin/true\n")
    monkeypatch.setenv(owners.UNIT_DIRS_ENV, ":".join(map(str, tree[0])))
    cfg = config.Config(config.Settings(), declared.read(tree[0], services).blocks)
    paths = sorted(o.path for b in owners.resolve(cfg) for o in b.owners)
    assert paths == ["/init.scope", "/system.slice/cups.service", "/system.slice/cups.socket"]


def test_declarations_merge_with_toml_and_show_both_origins(tree, tmp_path, monkeypatch):
    (etc, _, _), services = tree
    dropin = write(etc / "cups.service.d" / "ports.conf", "[Unit]\nX-PortGuard-Reserve=631/tcp\n")
    toml = write(
        tmp_path / "portguard.toml",
        '[guard]\nportreserve_dir = ""\n[[reserve]]\nports = ["631/tcp"]\ncgroup = "/printing"\n',
    )
    monkeypatch.setenv(owners.UNIT_DIRS_ENV, ":".join(map(str, tree[0])))
    cfg = config.load([toml], unit_dirs=tree[0])
    the_plan = plan.build(cfg.settings, *owners.resolve_all(cfg), LIMITS)
    assert set(the_plan.owners_of(6, 631)) == {"/printing", "/system.slice/cups.service"}
    assert [str(o) for o in the_plan.origins[("tcp", 631)]] == [f"{toml}:4", f"{dropin}:2"]


def test_unit_files_false_reads_no_unit_file(tree, tmp_path):
    (etc, _, _), _ = tree
    write(etc / "cups.service.d" / "ports.conf", "[Unit]\nX-PortGuard-Reserve=631/tcp\n")
    toml = write(tmp_path / "p.toml", '[guard]\nunit_files = false\nportreserve_dir = ""\n')
    assert config.load([toml], unit_dirs=tree[0]).blocks == ()
    toml.write_text('[guard]\nportreserve_dir = ""\n')
    assert len(config.load([toml], unit_dirs=tree[0]).blocks) == 1


def test_a_units_problem_does_not_stop_the_configuration_from_loading(tree, tmp_path):
    (etc, _, _), _ = tree
    write(etc / "cups.service.d" / "ports.conf", "[Unit]\nX-PortGuard-Reserve=99999\n")
    toml = write(tmp_path / "p.toml", '[guard]\nportreserve_dir = ""\n')
    cfg = config.load([toml], unit_dirs=tree[0])
    assert cfg.blocks == () and len(cfg.unit_problems) == 1
    assert "ports.conf:2" in cfg.unit_problems[0]
