"""The programs of the object by role, and the links (pinned as link_<role>) that attach them."""

from __future__ import annotations

from guard.kernel import libbpf

# role -> program name in bpf/guard.bpf.c; the bind roles by denial style (see host.choose_denial):
# the cgroup bind hooks with bpf_set_retval, the fmod_ret program on security_socket_bind, the
# cgroup bind hooks with plain EPERM
BIND_PROGRAMS = {
    "retval": {"bind4": "portguard_bind4", "bind6": "portguard_bind6"},
    "socket_bind": {"socket_bind": "portguard_socket_bind"},
    "eperm": {"bind4": "portguard_bind4_eperm", "bind6": "portguard_bind6_eperm"},
}
# Programs a road loads that no link attaches: the security_socket_bind road's judge, which
# portguard_socket_bind tail-calls through the hook_judge program array (bpf/guard.h).
JUDGES = {"socket_bind": {"judge": "portguard_bind_judge"}}
JUDGE = "judge"  # the judge's role
OTHER_PROGRAMS = {
    "mkdir": "portguard_cgroup_mkdir",
    "rmdir": "portguard_cgroup_rmdir",
    "ingress": "portguard_ingress",
    "egress": "portguard_egress",
}
LINK_NAMES = ("bind4", "bind6", "socket_bind", "mkdir", "rmdir", "ingress", "egress")
TRACKER_LINKS = ("mkdir", "rmdir")
# the tracepoint each tracker's raw_tp program attaches to
TRACKER_TRACEPOINTS = {"mkdir": "cgroup_mkdir", "rmdir": "cgroup_rmdir"}
CGROUP_BIND_LINKS = tuple(libbpf.BIND_ATTACH_TYPES)
HOOK_LINK = "socket_bind"  # the fmod_ret link on security_socket_bind
BIND_LINKS = (*CGROUP_BIND_LINKS, HOOK_LINK)
# Attached only while some reservation has contain on: without it no packet pays for them.
PACKET_LINKS = tuple(libbpf.PACKET_ATTACH_TYPES)
CGROUP_ATTACH_TYPES = {**libbpf.BIND_ATTACH_TYPES, **libbpf.PACKET_ATTACH_TYPES}
# the links whose programs read the maps on a bind or a packet
BIND_AND_PACKET_LINKS = (*BIND_LINKS, *PACKET_LINKS)


def program_names(denial: str) -> dict[str, str]:
    """role -> the program that plays it with this denial style."""
    return {**BIND_PROGRAMS[denial], **JUDGES.get(denial, {}), **OTHER_PROGRAMS}


def core_links(denial: str) -> tuple[str, ...]:
    """The links a guard with this denial style always has (the packet links come and go
    with containment)."""
    return (*BIND_PROGRAMS[denial], *TRACKER_LINKS)


def not_loaded(denial: str, contain: bool) -> tuple[str, ...]:
    """Programs of the object not to load: the other denial styles', and the packet programs
    where this kernel would refuse them."""
    skip = [
        name
        for style, names in (*BIND_PROGRAMS.items(), *JUDGES.items())
        if style != denial
        for name in names.values()
    ]
    if not contain:
        skip += [OTHER_PROGRAMS[role] for role in PACKET_LINKS]
    return tuple(skip)
