"""pyvmm.record: the dataclass-like records of the start-up path behave as frozen dataclasses do."""

from __future__ import annotations

import subprocess
import sys
from typing import ClassVar

import pytest

from pyvmm.record import FrozenError, field, fields, record, replace


@record
class Point:
    x: int
    y: int = 0
    tags: list[str] = field(default_factory=list)
    LIMIT: ClassVar[int] = 10

    def __post_init__(self) -> None:
        if self.x > self.LIMIT:
            raise ValueError("x too large")


@record(frozen=False)
class Counter:
    n: int = 0


def test_init_positional_keyword_defaults_and_factories() -> None:
    a = Point(1)
    b = Point(1, 2, ["t"])
    c = Point(x=1, tags=["t"], y=2)
    assert (a.x, a.y, a.tags) == (1, 0, [])
    assert b == c and a != b
    assert Point(1).tags is not Point(1).tags  # a fresh list each time
    assert fields(Point) == fields(a) == ("x", "y", "tags")
    assert repr(b) == "Point(x=1, y=2, tags=['t'])"
    assert Point.LIMIT == 10 and "LIMIT" not in fields(Point)


@pytest.mark.parametrize("call", [lambda: Point(), lambda: Point(1, 2, [], 4), lambda: Point(1, x=1),  # type: ignore[call-arg, misc]
                                  lambda: Point(1, z=3)])  # type: ignore[call-arg]
def test_bad_arguments_are_type_errors(call: object) -> None:
    with pytest.raises(TypeError):
        call()  # type: ignore[operator]


def test_post_init_checks_every_instance_and_replace() -> None:
    with pytest.raises(ValueError):
        Point(11)
    p = Point(1, 2)
    assert replace(p, y=5) == Point(1, 5) and p.y == 2
    with pytest.raises(ValueError):
        replace(p, x=11)
    with pytest.raises(TypeError):
        replace(p, z=1)


def test_frozen_records_refuse_assignment_and_hash_by_value() -> None:
    p = Point(1, 2)
    with pytest.raises(FrozenError):
        p.x = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.y  # type: ignore[misc]
    assert hash(Point(1, 2, ())) == hash(Point(1, 2, ()))  # type: ignore[arg-type]
    assert {Point(3, 4, ()), Point(3, 4, ())} == {Point(3, 4, ())}  # type: ignore[arg-type]


def test_mutable_records_assign_and_are_not_hashable() -> None:
    c = Counter()
    c.n += 1
    assert c == Counter(1)
    with pytest.raises(TypeError):
        hash(c)


def test_definition_errors() -> None:
    with pytest.raises(TypeError, match="mutable default"):
        @record
        class Bad:
            items: list[int] = []  # noqa: RUF012
    with pytest.raises(TypeError, match="without a default"):
        @record
        class Order:
            a: int = 0
            b: int  # type: ignore[misc]


def test_record_does_not_import_dataclasses() -> None:
    code = "import sys, pyvmm.record; print('dataclasses' in sys.modules, 'inspect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
