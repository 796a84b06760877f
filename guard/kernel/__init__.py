"""kernel: the guard in the kernel. Root.

libbpf (the binding; the only module that calls libbpf), layout (the Python side of the
contract in bpf/guard.h), objects (the compiled object), pins and slots (what is pinned and
how a slot is encoded), host (preflight, features, locks), sysctl, programs, apply (the
apply/remove transaction).

Import rule: kernel imports guard.policy (plans and settings) and never guard.observe or the
commands on top (guard.commands, guard.entry, guard.cli, guard.demo). Nothing outside kernel
imports guard.kernel.apply except those commands.
"""
