"""guard.tuples.NamedTuple builds what typing.NamedTuple builds from the same class statement:
held side by side, the two classes behave alike (fields, defaults, keywords, errors, _replace,
_asdict, _make, repr, pickling, equality, the body's methods and docstring)."""

from __future__ import annotations

import pickle
import typing  # noqa: F401 (the class statements below name it)

import pytest

from guard import tuples  # noqa: F401 (the class statements below name it)

BODY = '''
class Point{n}({base}):
    """A point."""

    x: int
    y: int
    label: str = "p"
    tags: tuple = ()

    @property
    def norm1(self) -> int:
        return abs(self.x) + abs(self.y)

    def moved(self, dx: int):
        return self._replace(x=self.x + dx)
'''
exec(BODY.format(n=1, base="tuples.NamedTuple"))
exec(BODY.format(n=2, base="typing.NamedTuple"))
OURS, THEIRS = Point1, Point2  # noqa: F821 (made just above, at module level: picklable)
CALLS = [
    ((1, 2), {}),
    ((1, 2, "q"), {}),
    ((1,), {"y": 2}),
    ((), {"x": 1, "y": 2, "tags": (3,)}),
    ((1, 2, "q", (4,)), {}),
]
BAD_CALLS = [
    ((1,), {}),
    ((), {}),
    ((1, 2, "q", (), 5), {}),
    ((1, 2), {"z": 3}),
    ((1, 2), {"x": 3}),
]


@pytest.mark.parametrize(("args", "kwargs"), CALLS)
def test_the_same_values_fields_and_behaviour(args, kwargs):
    ours, theirs = OURS(*args, **kwargs), THEIRS(*args, **kwargs)
    assert tuple(ours) == tuple(theirs) and ours == theirs and hash(ours) == hash(theirs)
    assert ours._asdict() == theirs._asdict()
    assert ours._replace(y=9) == theirs._replace(y=9)
    assert repr(ours) == repr(theirs).replace("Point2", "Point1")
    assert (ours.norm1, ours.moved(1)) == (theirs.norm1, theirs.moved(1))
    assert type(ours.moved(1)) is OURS
    assert pickle.loads(pickle.dumps(ours)) == ours
    assert isinstance(ours, tuple) and not hasattr(ours, "__dict__")


def test_the_same_class_attributes():
    for name in ("_fields", "_field_defaults", "__match_args__", "__doc__"):
        assert getattr(OURS, name) == getattr(THEIRS, name), name
    assert list(OURS.__annotations__) == list(THEIRS.__annotations__)
    assert OURS._make([1, 2, "a", ()]) == THEIRS._make([1, 2, "a", ()])
    assert OURS.x.__doc__ == THEIRS.x.__doc__


@pytest.mark.parametrize(("args", "kwargs"), BAD_CALLS)
def test_the_same_errors_for_wrong_arguments(args, kwargs):
    with pytest.raises(TypeError):
        THEIRS(*args, **kwargs)
    with pytest.raises(TypeError):
        OURS(*args, **kwargs)


def test_the_same_refusals_of_a_wrong_class_statement():
    for base in ("tuples.NamedTuple", "typing.NamedTuple"):
        with pytest.raises(TypeError):  # a field without a default after one with
            exec(f"class Bad({base}):\n    a: int = 1\n    b: int\n")
        with pytest.raises(AttributeError):
            exec(f"class Bad({base}):\n    a: int\n    _asdict = 1\n")
    with pytest.raises(ValueError):
        OURS(1, 2)._replace(z=1)
    with pytest.raises(TypeError):
        OURS._make([1])


def test_the_boot_s_classes_come_without_collections():
    import subprocess
    import sys

    code = (
        "import sys\nfrom guard import tuples\n"
        "class A(tuples.NamedTuple):\n    a: int\n    b: int = 2\n"
        "assert A(1) == (1, 2)\nprint('collections' in sys.modules)"
    )
    root = __file__.rsplit("/tests/", 1)[0]
    run = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, cwd=root)
    out = run.stdout.decode()
    assert out.strip() == "False"
