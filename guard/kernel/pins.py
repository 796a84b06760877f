"""Where the guard lives in bpffs, and its pinned maps opened with their layout types.

Everything that reads the guard (apply, remove, status, monitor) opens it from here, so
reading never needs the apply transaction.
"""

from __future__ import annotations

import ctypes as C
import os

from guard import paths
from guard.kernel import layout, libbpf
from guard.kernel.programs import HOOK_LINK


class Pins:
    """Where everything lives in bpffs."""

    __slots__ = ("root",)

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = paths.normal(root)

    @property
    def maps_dir(self) -> str:
        return f"{self.root}/maps-{layout.LAYOUT}"

    def link(self, name: str) -> str:
        return f"{self.root}/link_{name}"

    @property
    def judge(self) -> str:
        """hook_judge, shared by every layout's maps (bpf/guard.h)."""
        return f"{self.root}/hook_judge"

    @property
    def gate(self) -> str:
        """hook_gate: where versions before hook_judge kept the map that said which of two
        security_socket_bind programs judged; taken away once their program is gone."""
        return f"{self.root}/hook_gate"

    def staged_link(self, name: str) -> str:
        return f"{self.root}/link_{name}_new"  # bpffs refuses names with a dot

    def maps_dirs(self) -> list[str]:
        """Every maps directory under the root (this layout's, others', retired ones), sorted;
        none when the root is missing."""
        try:
            names = os.listdir(self.root)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(f"{self.root}/{name}" for name in names if name.startswith("maps-"))

    def other_maps_dirs(self) -> list[str]:
        """Maps of other layouts or retired ones: not what this version reads."""
        return [d for d in self.maps_dirs() if d != self.maps_dir]


class Maps:
    """The pinned maps, opened with their layout types. Owns the fds."""

    def __init__(self, fds: dict[str, int]):
        self.fds = fds
        self.by_name = {
            name: libbpf.Map(fds[name], spec.key, spec.value, percpu=spec.percpu)
            for name, spec in layout.MAPS.items()
        }

    def __getattr__(self, name: str) -> libbpf.Map:
        try:
            return self.__dict__["by_name"][name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def open_pinned(cls, maps_dir: str) -> Maps | None:
        """The complete set of maps of this layout, or None when any is missing or is not
        what the layout says (a half-created set, a foreign or damaged pin)."""
        fds: dict[str, int] = {}
        try:
            for name in layout.MAPS:
                fd = open_map(os.path.join(maps_dir, name), name)
                if fd is None:
                    return None
                fds[name] = fd
        finally:
            if len(fds) < len(layout.MAPS):
                for other in fds.values():
                    os.close(other)
        return cls(fds)

    def ids(self) -> set[int]:
        return {libbpf.map_info(fd).id for fd in self.fds.values()}

    def close(self) -> None:
        for m in self.by_name.values():
            m.release()
        for fd in self.fds.values():
            os.close(fd)

    @property
    def active(self) -> int:
        st = self.state.lookup(0)
        return st.active & 1 if st else 0


def judge_of(pins: Pins, dispatcher_id: int) -> int:
    """The program a security_socket_bind program (by id) hands each bind to: the judge in
    hook_judge (bpf/guard.h) when the program tail-calls this pin directory's hook_judge;
    0 when it holds none, or the program does not (a version before hook_judge, whose
    program judges itself)."""
    fd = _judge_calling(pins, dispatcher_id)
    if fd is None:
        return 0
    try:
        judge = libbpf.Map(fd, layout.JUDGE.key, layout.JUDGE.value).lookup(0)
    finally:
        os.close(fd)
    return int(judge or 0)  # the program's id


def tail_calls_judge(pins: Pins, prog_id: int) -> bool:
    """Whether the program hands its binds to this pin directory's hook_judge."""
    fd = _judge_calling(pins, prog_id)
    if fd is not None:
        os.close(fd)
    return fd is not None


def _judge_calling(pins: Pins, prog_id: int) -> int | None:
    """An fd of the pinned hook_judge when the program uses it, else None."""
    fd = open_map(pins.judge, "hook_judge", layout.JUDGE)
    if fd is not None and libbpf.map_info(fd).id not in libbpf.prog_map_ids(prog_id):
        os.close(fd)
        return None
    return fd


def reading_program(pins: Pins, name: str, prog_id: int) -> int:
    """The program that reads the maps for the pinned link `name` whose program is prog_id:
    that program, or the security_socket_bind link's judge (0: none)."""
    return judge_of(pins, prog_id) if name == HOOK_LINK else prog_id


def open_map(path: str, name: str, spec: layout.MapSpec | None = None) -> int | None:
    """fd of the map pinned at path when it has the layout's key and value sizes for the
    map called name (or those of `spec`)."""
    spec = spec or layout.MAPS[name]
    try:
        fd = libbpf.get_pinned(path)
    except libbpf.BpfError:
        return None
    if fd is None:
        return None
    kind, _ = libbpf.object_kind(fd)
    if kind == "map":
        info = libbpf.map_info(fd)
        if (info.key_size, info.value_size) == (C.sizeof(spec.key), C.sizeof(spec.value)) and (
            spec.type != layout.PROG_ARRAY or info.type == layout.PROG_ARRAY
        ):
            return fd
    os.close(fd)
    return None
