"""pyvmm.statictypes: typing's NamedTuple class syntax without importing typing gives the same classes."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from pyvmm import statictypes


def _pair(base: type) -> type:
    class Point(base):  # type: ignore[valid-type,misc]
        """A point."""

        x: int
        y: int = 2
        label: str = "p"

        @property
        def norm1(self) -> int:
            return abs(self.x) + abs(self.y)

        @classmethod
        def origin(cls) -> Point:
            return cls(0, 0)

        def moved(self, dx: int) -> Point:
            return self._replace(x=self.x + dx)

    return Point


@pytest.mark.parametrize("attr", ["_fields", "_field_defaults", "__doc__", "__qualname__", "__module__"])
def test_the_class_matches_typings(attr: str) -> None:
    mine, theirs = _pair(statictypes.NamedTuple), _pair(typing.NamedTuple)
    assert getattr(mine, attr) == getattr(theirs, attr)


def test_instances_behave_as_typings() -> None:
    mine, theirs = _pair(statictypes.NamedTuple), _pair(typing.NamedTuple)
    for cls in (mine, theirs):
        p = cls(-3)
        assert (p.x, p.y, p.label, p.norm1) == (-3, 2, "p", 5)
        assert p == (-3, 2, "p") and isinstance(p, tuple) and hash(p) == hash((-3, 2, "p"))
        assert repr(p) == "Point(x=-3, y=2, label='p')"
        assert p.moved(4) == cls(1, 2, "p") and cls.origin() == (0, 0, "p")
        assert p._asdict() == {"x": -3, "y": 2, "label": "p"}
        assert cls._make([1, 2, "q"]) == cls(x=1, y=2, label="q")
        x, y, label = p
        assert (x, y, label) == (-3, 2, "p")
        with pytest.raises(AttributeError):
            p.x = 1  # type: ignore[misc]
        with pytest.raises(TypeError):
            cls()


def test_a_field_without_default_after_one_with_is_refused() -> None:
    with pytest.raises(TypeError):
        class Bad(statictypes.NamedTuple):  # type: ignore[misc]
            a: int = 1
            b: int


def test_protocol_is_a_plain_base_and_typing_stays_unimported() -> None:
    assert statictypes.Protocol is object
    out = subprocess.run([sys.executable, "-c", "import sys, pyvmm.statictypes; print('typing' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
