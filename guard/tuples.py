"""typing.NamedTuple's class syntax without importing typing.

The modules a boot's `portguard apply` imports keep their plain data in named tuples (not
dataclasses: see guard/commands.py). typing itself costs ~2 ms of that boot's imports and
brings re and enum along (~4 ms more), for nothing but the class statement; this builds the
same class: collections.namedtuple with the annotated fields (in order, defaults from their
class values), and the class body's methods, properties and docstring on it. Type checkers
see typing.NamedTuple itself.
"""

from __future__ import annotations

import collections

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple
else:
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
            cls = collections.namedtuple(
                typename,
                list(annotations),
                defaults=[namespace[name] for name in defaults],
                module=namespace["__module__"],
            )
            cls.__annotations__ = cls.__new__.__annotations__ = dict(annotations)
            for key, value in namespace.items():
                if key in _PROHIBITED:
                    raise AttributeError("Cannot overwrite NamedTuple attribute " + key)
                if key not in _SPECIAL and key not in cls._fields:
                    setattr(cls, key, value)
            return cls

    class NamedTuple(metaclass=_NamedTupleMeta):
        """Base of a named tuple class written as typing.NamedTuple's are."""
