"""The ``typing`` names the run path needs at run time, without importing ``typing``.

Type checkers read this module's ``if TYPE_CHECKING:`` branch and see typing's own ``NamedTuple`` and
``Protocol``; the interpreter takes the other branch.  Why: every module of ``pyvmm run`` counts towards
command-to-guest time, and in the KVM lab (an emulated CPU, files over 9p) ``import typing`` with the
ten named tuples and six protocols of the run path cost about 85 ms of a 4 s boot: typing's import,
its check of every annotation (a ``compile`` of each string one) and its protocol machinery.

- :data:`TYPE_CHECKING`: False here; a type checker treats any ``if TYPE_CHECKING:`` as true, so
  ``from pyvmm.statictypes import TYPE_CHECKING`` works as typing's does.
- :class:`Protocol`: at run time a plain base class.  Nothing here checks a protocol at run time
  (no ``isinstance`` against one): protocols are for the type checker.
- :class:`NamedTuple`: the same class syntax and the same result as ``typing.NamedTuple``, a
  ``collections.namedtuple`` class (fields from the annotations, defaults from the class body, then the
  body's methods, properties and docstring), without typing's annotation checks.
"""

from __future__ import annotations

import collections

TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import NamedTuple as NamedTuple
    from typing import Protocol as Protocol
else:
    Protocol = object

    # What a class body holds besides its fields and methods; namedtuple makes its own.
    _SKIP = frozenset({"__module__", "__qualname__", "__annotations__", "__orig_bases__", "__classcell__"})

    class _NamedTupleMeta(type):
        def __new__(mcs, name: str, bases: tuple[type, ...], ns: dict[str, object]) -> type:
            if not bases:  # NamedTuple itself
                return super().__new__(mcs, name, bases, ns)
            annotations = ns.get("__annotations__", {})
            assert isinstance(annotations, dict)
            fields = list(annotations)
            defaults = []
            for f in fields:
                if f in ns:
                    defaults.append(ns[f])
                elif defaults:
                    raise TypeError(f"{name}: field {f} without a default follows one with a default")
            cls = collections.namedtuple(name, fields, defaults=defaults, module=str(ns.get("__module__")))
            for key, value in ns.items():
                if key in fields or key in _SKIP:
                    continue
                if key in ("_fields", "_make", "_replace", "_asdict", "_field_defaults", "__new__", "__init__",
                           "__getnewargs__", "__slots__"):
                    raise AttributeError(f"{name}: cannot overwrite NamedTuple attribute {key}")
                setattr(cls, key, value)
            cls.__qualname__ = str(ns.get("__qualname__", name))
            cls.__annotations__ = annotations
            return cls

    class NamedTuple(metaclass=_NamedTupleMeta):
        """Subclass it as typing.NamedTuple (module docstring)."""
