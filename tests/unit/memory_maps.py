"""In-memory stand-ins for the pinned maps (the interface of guard.kernel.libbpf.Map), with a
log of every write, so slot encoding and apply's order can be tested without root."""

from __future__ import annotations

import ctypes

from guard.kernel import layout


class MemoryMap:
    """A map of ctypes keys and values kept in a dict; every write is logged."""

    def __init__(self, name: str, key_type: type, value_type: type, log: list, percpu: bool):
        self.name, self.key_type, self.value_type = name, key_type, value_type
        self.log, self.percpu = log, percpu
        self.data: dict[bytes, tuple[object, object]] = {}
        self.fd = -1

    def _key(self, key):
        if isinstance(key, self.key_type):
            return key
        return self.key_type(*key) if isinstance(key, tuple) else self.key_type(key)

    def _value(self, value):
        if isinstance(value, self.value_type):
            return value
        return self.value_type(*value) if isinstance(value, tuple) else self.value_type(value)

    @staticmethod
    def _copy(obj):
        copy = type(obj)()
        ctypes.memmove(ctypes.addressof(copy), ctypes.addressof(obj), ctypes.sizeof(obj))
        return copy

    def slot_of(self, key) -> int | None:
        """The slot a key belongs to (the config map is indexed by slot)."""
        return key.value if self.name == "config" else getattr(key, "slot", None)

    def _out(self, value):
        """As libbpf.Map returns values: plain ints for scalar types, one per CPU per-CPU."""
        value = value.value if isinstance(value, ctypes._SimpleCData) else self._copy(value)
        return [value] if self.percpu else value

    def lookup(self, key):
        found = self.data.get(bytes(self._key(key)))
        return None if found is None else self._out(found[1])

    def update(self, key, value, flags: int = 0) -> bool:
        key, value = self._key(key), self._value(value)
        if flags == 1 and bytes(key) in self.data:  # BPF_NOEXIST
            return False
        self.data[bytes(key)] = (self._copy(key), self._copy(value))
        self.log.append((self.name, "update", self.slot_of(key)))
        return True

    def delete(self, key) -> bool:
        key = self._key(key)
        if self.data.pop(bytes(key), None) is None:
            return False
        self.log.append((self.name, "delete", self.slot_of(key)))
        return True

    def items(self) -> list:
        return [(self._copy(k), self._out(v)) for k, v in self.data.values()]

    def keys(self) -> list:
        return [k for k, _ in self.items()]

    def update_many(self, keys: list, values: list) -> None:
        for key, value in zip(keys, values, strict=True):
            self.update(key, value)

    def delete_many(self, keys: list) -> int:
        return sum(self.delete(k) for k in keys)


class MemoryMaps:
    """guard.kernel.pins.Maps in memory: every map of the layout, by name."""

    def __init__(self):
        self.log: list[tuple[str, str, int | None]] = []
        self.by_name = {
            name: MemoryMap(name, spec.key, spec.value, self.log, spec.percpu)
            for name, spec in layout.MAPS.items()
        }
        self.fds = {name: -1 for name in layout.MAPS}

    def __getattr__(self, name: str) -> MemoryMap:
        try:
            return self.__dict__["by_name"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def active(self) -> int:
        st = self.state.lookup(0)
        return st.active & 1 if st else 0

    def close(self) -> None:
        pass
