"""What the host must offer before anything is loaded: root, the initial cgroup namespace,
cgroup2, bpffs (mounted when missing), the attach cgroup, the kernel features the guard
needs, and the lock files that keep one apply (or monitor) at a time.

The load-time choices a kernel forces (where and how a refused bind is refused) are made
here too.
"""

from __future__ import annotations

import ctypes as C
import fcntl
import os

from guard import paths
from guard.errors import GuardError
from guard.kernel import cgroups, libbpf, snapshot
from guard.policy.config import Settings

TYPE_CHECKING = False  # annotations only: collections.abc would import collections
if TYPE_CHECKING:
    from collections.abc import Callable

# Where a refused bind is refused, in the order of preference:
DENY_SET_RETVAL = "retval"  # cgroup bind hooks, bpf_set_retval: the configured errno (5.18)
DENY_SOCKET_BIND = "socket_bind"  # fmod_ret on security_socket_bind: the configured errno
DENY_EPERM = "eperm"  # cgroup bind hooks without bpf_set_retval: the binder sees EPERM

NO_NETNS_COOKIE = (
    "this kernel cannot tell userspace its network namespace cookie (SO_NETNS_COOKIE, Linux >= "
    "5.14): the guard applies in every network namespace, containers with their own included"
)


def require_root(command: str, why: str = "it loads BPF programs into the kernel") -> None:
    if os.geteuid() != 0:
        raise GuardError(f"{command} must run as root: {why}")


def _within(path: str, top: str) -> bool:
    """path is top or below it (both spelled by paths.normal)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def _on_bpffs(path: str, mounts: str = cgroups.MOUNTS) -> bool:
    try:
        found = cgroups.mount_points("bpf", mounts)
    except cgroups.CgroupError:
        return False
    path = paths.normal(path)
    return any(_within(path, m) for m in found)


def _mount(source: str, target: str, fstype: str, data: str) -> None:
    libc = C.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, data.encode()) != 0:
        err = C.get_errno()
        raise GuardError(f"cannot mount {fstype} at {target}: {os.strerror(err)}")


def preflight(
    settings: Settings, *, mount_bpffs: bool, mounts: str = cgroups.MOUNTS
) -> tuple[str, str]:
    """Root, cgroup2, bpffs, the attach cgroup: (cgroup2 mount, attach dir) or GuardError."""
    require_root("portguard")
    try:
        cgroups.require_initial_namespace()
        root = cgroups.cgroup2_mount(mounts)
    except cgroups.CgroupError as exc:
        raise GuardError(str(exc)) from None
    attach_dir = cgroups.directory(settings.cgroup, root)
    if not os.path.isdir(attach_dir):
        raise GuardError(f"the attach cgroup {settings.cgroup} does not exist under {root}")
    pin_dir = paths.normal(settings.pin_dir)
    if not _on_bpffs(pin_dir, mounts):
        default = "/sys/fs/bpf"
        if mount_bpffs and _within(pin_dir, default) and os.path.isdir(default):
            _mount("bpf", default, "bpf", "mode=0700")
        else:
            raise GuardError(
                f"{pin_dir} is not on a BPF file system (mount -t bpf bpf /sys/fs/bpf)"
            )
    return root, attach_dir


def netns_cookie() -> int:
    """This network namespace's cookie, or 0 (guard every namespace) on kernels that cannot
    report it to userspace (SO_NETNS_COOKIE, Linux >= 5.14)."""
    return snapshot.netns_cookie()


def netns_inode() -> int:
    """This network namespace's inode number: how the security_socket_bind program knows the
    guarded namespace (user space can read it on every kernel)."""
    return snapshot.netns_inode()


def lock_path(pin_dir: str, role: str = "") -> str:
    """The lock file of one role (apply/remove, monitor, ...) for one pin directory."""
    try:
        # beside apply's records (guard/observe/outcome.py): tests point both at a directory
        # of their own, so that hundreds of sandboxes leave no lock in the machine's /run
        lock_dir = paths.run_dir()
        os.mkdir(lock_dir, 0o700)
    except FileExistsError:
        pass
    except OSError:
        lock_dir = "/tmp"
    return paths.join(lock_dir, paths.lock_name(paths.normal(pin_dir), role))


class locked:  # lower case: used as the function it was, with locked(...)
    """Hold the lock of one role for one pin directory; without wait, GuardError(busy) when
    another process holds it. (A class, not contextlib.contextmanager: contextlib and the
    collections and functools it imports cost ~1 ms of every boot's apply.)"""

    def __init__(self, pin_dir: str, role: str = "", *, wait: bool = True, busy: str = ""):
        self.path, self.wait, self.busy = lock_path(pin_dir, role), wait, busy

    def __enter__(self) -> None:
        self.lock = open(self.path, "w")  # noqa: SIM115 (closed by __exit__)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.close()
            raise GuardError(self.busy) from None
        except BaseException:
            self.lock.close()
            raise

    def __exit__(self, *exc_info) -> None:
        self.lock.close()


def check_features(features: libbpf.Features) -> None:
    """Refuse, naming what is missing, when the guard cannot hold on this kernel."""
    missing = []
    if not features.btf:
        missing.append(
            f"kernel BTF ({libbpf.VMLINUX_BTF}, CONFIG_DEBUG_INFO_BTF): without it the "
            "owner-cgroup trackers cannot load, and a restarted owner would be refused"
        )
    if not features.bpf_link:
        missing.append(
            "BPF links for cgroup programs (Linux >= 5.7): without them the guard could "
            "not be swapped atomically nor outlive apply safely"
        )
    if not features.ancestor_cgroup:
        missing.append(
            "bpf_get_current_ancestor_cgroup_id in bind programs (Linux >= 5.7): "
            "without it owners (and their sub-cgroups) cannot be recognised"
        )
    if not features.netns_cookie:
        missing.append(
            "bpf_get_netns_cookie in bind programs (Linux >= 5.7): without it the guard "
            "would also refuse binds inside every container's own network namespace"
        )
    if missing:
        raise GuardError(
            "this kernel cannot run portguard, nothing was loaded; it lacks "
            + "; and ".join(missing)
        )


def hook_failed(settings: Settings, why: str) -> str:
    """The warning when the security_socket_bind program itself failed where the probe's
    attached, and apply fell back to the EPERM cgroup programs."""
    return (
        f"this kernel refused portguard's security_socket_bind program ({why}): refused binds "
        f"fail with EPERM"
        + (f", not {settings.deny_errno}" if settings.deny_errno != "EPERM" else "")
    )


def choose_denial(
    settings: Settings,
    features: libbpf.Features | None = None,
    hook_refusal: Callable[[], str | None] | None = None,
) -> tuple[str, list[str]]:
    """Where and how the guard refuses binds on this kernel (DENY_SET_RETVAL, DENY_SOCKET_BIND
    or DENY_EPERM: the first the kernel offers, or the one refuse_at names), and the warnings
    that choice implies. hook_refusal (libbpf.hook_refusal) says why the
    kernel refuses the security_socket_bind program, None when it takes it."""
    features = features or libbpf.probe_features()
    check_features(features)
    forced = settings.refuse_at
    if forced == "cgroup" and not features.set_retval:
        raise GuardError(
            'refuse_at = "cgroup": this kernel refuses bpf_set_retval in cgroup bind programs '
            '(Linux < 5.18); nothing applied (set refuse_at = "auto")'
        )
    if forced == "cgroup" or (forced == "auto" and features.set_retval):
        return DENY_SET_RETVAL, []
    notes = []
    if forced in ("auto", "security_socket_bind"):
        why = (hook_refusal or libbpf.hook_refusal)()
        if why is None:
            return DENY_SOCKET_BIND, []
        if forced == "security_socket_bind":
            raise GuardError(
                'refuse_at = "security_socket_bind": this kernel refuses fmod_ret programs on '
                f'security_socket_bind ({why}); nothing applied (set refuse_at = "auto")'
            )
        lacks = (
            "this kernel lacks bpf_set_retval (Linux < 5.18) and refuses fmod_ret programs "
            f"on security_socket_bind ({why})"
        )
    else:
        lacks = 'refuse_at = "cgroup-eperm"'
    if settings.deny_errno != "EPERM":
        notes.append(f"{lacks}: refused binds fail with EPERM, not {settings.deny_errno}")
    return DENY_EPERM, notes
