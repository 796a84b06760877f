"""policy: what the administrator asked for, as a plan. Pure: no root, no kernel.

config files -> typed blocks (with file:line) -> owners resolved to cgroup paths -> plan.

Import rule: policy imports nothing from guard.kernel, guard.observe or the commands on top
(guard.commands, guard.entry, guard.cli, guard.demo).
What the kernel can hold (its limits) is handed to plan.build by the caller.
"""
