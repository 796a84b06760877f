"""typing.NamedTuple's class syntax without importing typing or collections.

The modules a boot's `portguard apply` imports keep their plain data in named tuples (not
dataclasses: see guard/commands.py). typing itself costs ~2 ms of that boot's imports and
brings re and enum along (~4 ms more), for nothing but the class statement; and
collections.namedtuple, which typing.NamedTuple calls, costs the import of collections (with
keyword, operator and reprlib) and compiles a __new__ for every class: ~2 ms more for the
~25 classes of that boot. This builds the same class from the class statement: a tuple
subclass with the annotated fields (in order, defaults from their class values), the
attributes collections.namedtuple gives one (_fields, _field_defaults, _make, _replace,
_asdict, __getnewargs__, __match_args__, the repr), and the class body's methods, properties
and docstring. Type checkers see typing.NamedTuple itself; tests/unit/test_tuples.py holds
the two side by side.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from _collections import _tuplegetter

    # what typing.NamedTuple refuses to overwrite, and what it does not copy from the body
    _PROHIBITED = frozenset(
        {
            "__new__",
            "__init__",
            "__slots__",
            "__getnewargs__",
            "_fields",
            "_field_defaults",
            "_make",
            "_replace",
            "_asdict",
            "_source",
        }
    )
    _SPECIAL = frozenset({"__module__", "__name__", "__annotations__"})
    _tuple_new = tuple.__new__

    def _bind(cls, args: tuple, kwargs: dict) -> tuple:
        """The field values of cls(*args, **kwargs), or the TypeError Python would raise."""
        fields = cls._fields
        if len(args) > len(fields):
            raise TypeError(
                f"{cls.__name__}.__new__() takes {len(fields) + 1} positional arguments "
                f"but {len(args) + 1} were given"
            )
        values = list(args)
        for name in fields[: len(args)]:
            if name in kwargs:
                raise TypeError(
                    f"{cls.__name__}.__new__() got multiple values for argument {name!r}"
                )
        missing = []
        for name in fields[len(args) :]:
            if name in kwargs:
                values.append(kwargs[name])
            elif name in cls._field_defaults:
                values.append(cls._field_defaults[name])
            else:
                missing.append(name)
        if missing:
            raise TypeError(
                f"{cls.__name__}.__new__() missing {len(missing)} required argument"
                f"{'s' if len(missing) > 1 else ''}: {', '.join(map(repr, missing))}"
            )
        unexpected = set(kwargs) - set(fields)
        if unexpected:
            raise TypeError(
                f"{cls.__name__}.__new__() got an unexpected keyword argument "
                f"{sorted(unexpected)[0]!r}"
            )
        return tuple(values)

    def _new(cls, *args, **kwargs):
        if kwargs or len(args) != len(cls._fields):
            args = _bind(cls, args, kwargs)
        return _tuple_new(cls, args)

    @classmethod
    def _make(cls, iterable):
        result = _tuple_new(cls, iterable)
        if len(result) != len(cls._fields):
            raise TypeError(f"Expected {len(cls._fields)} arguments, got {len(result)}")
        return result

    def _replace(self, /, **kwargs):
        result = self._make(
            [kwargs.pop(name, value) for name, value in zip(self._fields, self, strict=True)]
        )
        if kwargs:
            raise ValueError(f"Got unexpected field names: {list(kwargs)!r}")
        return result

    def _repr(self):
        inner = ", ".join(
            f"{name}={value!r}" for name, value in zip(self._fields, self, strict=True)
        )
        return f"{self.__class__.__name__}({inner})"

    def _asdict(self):
        return dict(zip(self._fields, self, strict=True))

    def _getnewargs(self):
        return tuple(self)

    class _NamedTupleMeta(type):
        def __new__(mcls, typename, bases, namespace):
            if not bases:  # NamedTuple itself
                return super().__new__(mcls, typename, bases, namespace)
            if len(bases) != 1:
                raise TypeError("can only inherit from a NamedTuple type")
            annotations = namespace.get("__annotations__", {})
            defaults = []
            for name in annotations:
                if name in namespace:
                    defaults.append(name)
                elif defaults:
                    raise TypeError(
                        f"Non-default namedtuple field {name} cannot follow default field"
                        f"{'s' if len(defaults) > 1 else ''} {', '.join(defaults)}"
                    )
            fields = tuple(annotations)
            body = {
                "__doc__": f"{typename}({', '.join(fields)})",
                "__slots__": (),
                "_fields": fields,
                "_field_defaults": {name: namespace[name] for name in defaults},
                "__new__": _new,
                "_make": _make,
                "_replace": _replace,
                "__repr__": _repr,
                "_asdict": _asdict,
                "__getnewargs__": _getnewargs,
                "__match_args__": fields,
                "__module__": namespace["__module__"],
                "__qualname__": namespace.get("__qualname__", typename),
                "__annotations__": dict(annotations),
            }
            for index, name in enumerate(fields):
                body[name] = _tuplegetter(index, f"Alias for field number {index}")
            for key, value in namespace.items():
                if key in _PROHIBITED:
                    raise AttributeError("Cannot overwrite NamedTuple attribute " + key)
                if key not in _SPECIAL and key not in fields:
                    body[key] = value
            return type(typename, (tuple,), body)

    class NamedTuple(metaclass=_NamedTupleMeta):
        """Base of a named tuple class written as typing.NamedTuple's are."""
