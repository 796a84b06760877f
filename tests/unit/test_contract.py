"""The kernel/user contract: bpf/guard.h, as compiled, against its Python side.

The compiled object's BTF (read with libbpf, no root, nothing loaded) is the judge: every
struct member's offset and size, every constant, each map's type, key, value and size, the
event record the monitor unpacks, the programs and their sections. The bpf_*_info structs the
binding reads are checked against the running kernel's own BTF.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from guard.kernel import layout, libbpf, objects, programs, sources
from guard.kernel.pins import Pins
from guard.observe import monitor
from guard.policy import config

SCALARS = {
    ctypes.c_uint8: "__u8",
    ctypes.c_uint16: "__u16",
    ctypes.c_uint32: "__u32",
    ctypes.c_uint64: "__u64",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> libbpf.ObjectDescription:
    path = objects.cached_object()
    if path is None:
        if objects.find_clang() is None:
            pytest.skip("no compiled object and no clang to build one")
        path = objects.build(directory=tmp_path_factory.mktemp("object"))
    return libbpf.describe_object(path)


def members(structure: type[ctypes.Structure]) -> tuple[tuple[str, int, int], ...]:
    """(name, offset, size) of a ctypes structure's fields, as BTF reports a struct's."""
    return tuple(
        (name, getattr(structure, name).offset, getattr(structure, name).size)
        for name, *_ in structure._fields_
    )


def type_name(ctype: type) -> str:
    if issubclass(ctype, ctypes.Structure):
        return {v: k for k, v in layout.STRUCTS.items()}[ctype]
    return SCALARS[ctype]


def test_every_struct_of_the_contract_is_mirrored_member_by_member(compiled):
    contract = {name for name in compiled.structs if name.startswith("pg_")}
    assert contract == set(layout.STRUCTS)
    for name, mirror in layout.STRUCTS.items():
        btf = compiled.structs[name]
        assert (btf.size, btf.members) == (ctypes.sizeof(mirror), members(mirror)), name


def test_every_constant_of_the_contract_has_its_value_on_both_sides(compiled):
    contract = {name: v for name, v in compiled.enums.items() if name.startswith("pg_")}
    assert contract == layout.ENUMS


def test_each_map_has_the_type_key_value_and_size_the_controller_uses(compiled):
    own = {"events": layout.EVENTS, "scratch": layout.SCRATCH, "hook_judge": layout.JUDGE}
    assert set(compiled.maps) == set(layout.MAPS) | set(own)
    checked = {**layout.MAPS, "scratch": layout.SCRATCH, "hook_judge": layout.JUDGE}
    for name, spec in checked.items():
        found = compiled.maps[name]
        assert (found.type, found.max_entries) == (spec.type, spec.max_entries), name
        assert (found.key, found.value) == (type_name(spec.key), type_name(spec.value)), name
        assert (found.key_size, found.value_size) == (
            ctypes.sizeof(spec.key),
            ctypes.sizeof(spec.value),
        ), name
    events = compiled.maps["events"]
    assert (events.type, events.max_entries) == (layout.EVENTS.type, layout.EVENTS.max_entries)


def test_the_monitor_unpacks_the_event_record_as_compiled(compiled):
    event = compiled.structs["pg_event"]
    name, offset, size = event.members[-1]
    assert monitor.EVENT.size == offset + size <= event.size  # the rest is tail padding
    # layout.Event is checked against BTF above; that the monitor's format unpacks every
    # field of layout.Event where it lies is test_observability_unit's
    # test_event_struct_reads_what_the_layout_header_describes.


def test_the_programs_come_from_the_object_with_their_sections(compiled):
    sections = {
        "bind4": "cgroup/bind4",
        "bind6": "cgroup/bind6",
        "socket_bind": "fmod_ret/security_socket_bind",
        "judge": "fmod_ret/security_socket_bind",  # tail-called, never attached
        "mkdir": "raw_tp/cgroup_mkdir",
        "rmdir": "raw_tp/cgroup_rmdir",
        "ingress": "cgroup_skb/ingress",
        "egress": "cgroup_skb/egress",
    }
    played = set()
    for denial in programs.BIND_PROGRAMS:
        for role, name in programs.program_names(denial).items():
            assert compiled.programs[name] == sections[role], name
            played.add(name)
        # the other styles' bind programs are the only ones left out
        skipped = set(programs.not_loaded(denial, contain=True))
        assert skipped == set(compiled.programs) - set(programs.program_names(denial).values())
    assert played == set(compiled.programs)


def test_config_refuses_paths_the_kernel_key_could_not_hold():
    # a path of MAX_PATH_BYTES plus the NUL must be shorter than PG_PATH_MAX (the programs
    # refuse a path that fills the key, as it might be truncated)
    assert config.MAX_PATH_BYTES == layout.PATH_MAX - 2


VMLINUX = Path("/sys/kernel/btf/vmlinux")


@pytest.mark.parametrize(
    "name, mirror",
    [
        ("bpf_link_info", libbpf.LinkInfo),
        ("bpf_prog_info", libbpf.ProgInfo),
        ("bpf_map_info", libbpf.MapInfo),
    ],
)
def test_the_info_structs_match_the_running_kernel(name, mirror):
    try:
        kernel = libbpf.btf_structs(VMLINUX, [name])
    except libbpf.BpfError as exc:
        pytest.skip(f"no kernel BTF: {exc}")
    by_name = {m[0]: m for m in kernel[name].members}
    for field in members(mirror):
        if field[0].startswith("_"):
            continue  # padding
        if field[0] == "details":  # the anonymous union of bpf_link_info
            assert by_name[""][1] == field[1]
            continue
        assert by_name[field[0]] == field, field[0]
    assert ctypes.sizeof(mirror) <= kernel[name].size


def test_the_event_is_unpacked_in_the_hosts_byte_order():
    # the object is built for the host's byte order (objects.host_target), so the record is
    # in native order, with standard sizes and no alignment added by struct
    assert monitor.EVENT.format.startswith("=")


def test_the_layout_names_the_header_so_a_changed_contract_gets_new_maps(tmp_path, monkeypatch):
    header = (Path(sources.bpf_source_dir()) / "guard.h").read_text()
    assert layout._layout_digest() == layout.LAYOUT
    (tmp_path / "guard.h").write_text(header.replace("PG_MAX_OWNERS = 64", "PG_MAX_OWNERS = 65"))
    monkeypatch.setattr(layout, "bpf_source_dir", lambda: tmp_path)
    changed = layout._layout_digest()
    assert changed != layout.LAYOUT
    monkeypatch.setattr(layout, "LAYOUT", changed)
    assert Pins(Path("/pins")).maps_dir == f"/pins/maps-{changed}"
