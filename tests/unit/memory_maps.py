"""In-memory stand-ins for the pinned maps (the interface of guard.kernel.libbpf.Map), with a
log of every write, so slot encoding and apply's order can be tested without root."""

from __future__ import annotations

import ctypes

from guard.kernel import layout


class MemoryMap:
    """A map of ctypes keys and values kept in a dict; every write is logged."""

    def __init__(self, name: str, spec: layout.MapSpec, log: list):
        self.name, self.key_type, self.value_type = name, spec.key, spec.value
        self.log, self.percpu = log, spec.percpu
        self.array = spec.type in (layout.ARRAY, layout.PERCPU_ARRAY)
        # maps sized to the policy: as small as a small policy makes them
        self.max_entries = 256 if name in layout.SIZED_MAPS else spec.max_entries
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
        """The slot a key belongs to (config is indexed by slot, sets by set and slot, ports
        by slot and port)."""
        if self.name == "config":
            return key.value
        if self.name == "sets":
            return key.value % layout.SLOTS
        if self.name == "ports":
            return layout.slot_of_port_index(key.value)
        return getattr(key, "slot", None)

    def _out(self, value):
        """As libbpf.Map returns values: plain ints for scalar types, one per CPU per-CPU."""
        value = value.value if isinstance(value, ctypes._SimpleCData) else self._copy(value)
        return [value] if self.percpu else value

    def lookup(self, key):
        key = self._key(key)
        found = self.data.get(bytes(key))
        if found is None and self.array and 0 <= key.value < self.max_entries:
            return self._out(self.value_type())  # an array has every element, zero at first
        return None if found is None else self._out(found[1])

    def read_range(self, start: int, count: int):
        values = (self.value_type * count)()
        for i in range(count):
            values[i] = self.lookup(start + i)
        return values

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
        self.by_name = {name: MemoryMap(name, spec, self.log) for name, spec in layout.MAPS.items()}
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
