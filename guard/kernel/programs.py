"""The programs of the object by role, and the links (pinned as link_<role>) that attach them."""

from __future__ import annotations

from guard.kernel import libbpf

# role -> program name in bpf/guard.bpf.c; the bind roles by denial style (see host.choose_denial)
BIND_PROGRAMS = {
    "retval": {"bind4": "portguard_bind4", "bind6": "portguard_bind6"},
    "eperm": {"bind4": "portguard_bind4_eperm", "bind6": "portguard_bind6_eperm"},
}
OTHER_PROGRAMS = {
    "mkdir": "portguard_cgroup_mkdir",
    "rmdir": "portguard_cgroup_rmdir",
    "ingress": "portguard_ingress",
    "egress": "portguard_egress",
}
LINK_NAMES = ("bind4", "bind6", "mkdir", "rmdir", "ingress", "egress")
TRACKER_LINKS = ("mkdir", "rmdir")
# Attached only while some reservation has contain on: without it no packet pays for them.
PACKET_LINKS = tuple(libbpf.PACKET_ATTACH_TYPES)
CORE_LINKS = tuple(name for name in LINK_NAMES if name not in PACKET_LINKS)
CGROUP_ATTACH_TYPES = {**libbpf.BIND_ATTACH_TYPES, **libbpf.PACKET_ATTACH_TYPES}
BIND_AND_PACKET_LINKS = tuple(CGROUP_ATTACH_TYPES)


def program_names(denial: str) -> dict[str, str]:
    """role -> the program that plays it with this denial style."""
    return {**BIND_PROGRAMS[denial], **OTHER_PROGRAMS}


def not_loaded(denial: str, contain: bool) -> tuple[str, ...]:
    """Programs of the object not to load: the other denial style's, and the packet programs
    where this kernel would refuse them."""
    skip = [
        name for style, names in BIND_PROGRAMS.items() if style != denial for name in names.values()
    ]
    if not contain:
        skip += [OTHER_PROGRAMS[role] for role in PACKET_LINKS]
    return tuple(skip)
