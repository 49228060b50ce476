"""Small record classes for the modules every ``pyvmm run`` imports, without the dataclasses module.

``@record`` gives a class what ``@dataclass(frozen=True)`` would: an ``__init__`` taking its annotated
fields (positionally or by name, with defaults and :func:`field` factories) that calls ``__post_init__``,
``__repr__``, ``__eq__``, ``__hash__`` and attributes that cannot be assigned; ``@record(frozen=False)``
one with assignable attributes and no hash.  :func:`replace` makes a changed copy (through ``__init__``,
so ``__post_init__`` checks it again) and :func:`fields` lists the field names.  Type checkers read the
decorator as a dataclass (PEP 681 ``dataclass_transform``).

Why not dataclasses: ``import dataclasses`` imports ``inspect`` and with it ``ast``, ``dis`` and
``tokenize``, and ``@dataclass`` compiles every generated method with ``exec``.  Measured in the KVM lab
(an emulated CPU, where start-up is a large part of command-to-guest time): about 0.1 s of the imports
before the first ``KVM_RUN``, for classes that are made a handful of times per run.  The generated
methods here are shared functions that read the class's field list, slower per call but made once.
Modules off that path (tests, benchmarks, the gdb server, the lab) keep using dataclasses.
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmm.statictypes import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, TypeVar, dataclass_transform, overload

    T = TypeVar("T")
    C = TypeVar("C", bound=type)
else:  # typing's decorator marks the function for type checkers (pyvmm.statictypes says why not typing)
    def dataclass_transform(**kwargs):
        def mark(fn):
            fn.__dataclass_transform__ = kwargs  # what typing's sets, for introspection
            return fn
        return mark

_MISSING = object()


class FrozenError(AttributeError):
    """Assignment to an attribute of a frozen record."""


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], T]) -> T:
    """A field whose default is made by ``default_factory()`` for each new record (a list, a dict)."""
    return _Factory(default_factory)  # type: ignore[return-value]  # replaced by the value in __init__


def fields(obj: object) -> tuple[str, ...]:
    """The field names of a record class or record, in declaration order."""
    cls = obj if isinstance(obj, type) else type(obj)
    names: tuple[str, ...] = cls.__record_fields__  # type: ignore[attr-defined]
    return names


def replace(obj: T, **changes: Any) -> T:
    """A copy of ``obj`` with ``changes``, made (and checked) by the class's ``__init__``."""
    cls = type(obj)
    unknown = set(changes) - set(fields(cls))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    return cls(**{name: changes.get(name, getattr(obj, name)) for name in fields(cls)})


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    names: tuple[str, ...] = cls.__record_fields__
    if len(args) > len(names):
        raise TypeError(f"{cls.__name__}() takes {len(names)} positional arguments but {len(args)} were given")
    values = dict(zip(names, args, strict=False))  # the rest come by name or default
    for name, value in kwargs.items():
        if name not in names:
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {name!r}")
        if name in values:
            raise TypeError(f"{cls.__name__}() got multiple values for argument {name!r}")
        values[name] = value
    defaults: dict[str, object] = cls.__record_defaults__
    for name in names:
        if name not in values:
            default = defaults.get(name, _MISSING)
            if default is _MISSING:
                raise TypeError(f"{cls.__name__}() missing required argument {name!r}")
            values[name] = default.make() if isinstance(default, _Factory) else default
        object.__setattr__(self, name, values[name])
    post_init = getattr(self, "__post_init__", None)
    if post_init is not None:
        post_init()


def _repr(self: Any) -> str:
    inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in fields(self))
    return f"{type(self).__qualname__}({inner})"


def _values(self: Any) -> tuple[object, ...]:
    return tuple(getattr(self, name) for name in fields(self))


def _eq(self: object, other: object) -> object:
    if type(other) is not type(self):
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash(_values(self))


def _frozen_setattr(self: Any, name: str, value: object) -> None:
    raise FrozenError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")


def _frozen_delattr(self: Any, name: str) -> None:
    raise FrozenError(f"cannot delete field {name!r} of a frozen {type(self).__name__}")


def _make_record(cls: C, frozen: bool) -> C:
    own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063  # inspect is what this module avoids
    names = tuple(name for name, kind in own.items() if not str(kind).startswith("ClassVar"))
    defaults = {name: cls.__dict__[name] for name in names if name in cls.__dict__}
    required_after_default = [n for i, n in enumerate(names) if n not in defaults and any(m in defaults for m in names[:i])]
    if required_after_default:
        raise TypeError(f"{cls.__name__}: field {required_after_default[0]!r} without a default follows one with a default")
    for name, default in defaults.items():
        if isinstance(default, list | dict | set):
            raise TypeError(f"{cls.__name__}.{name}: a mutable default is shared; use field(default_factory=...)")
        if isinstance(default, _Factory):
            delattr(cls, name)  # the instance attribute is set by __init__
    cls.__record_fields__ = names  # type: ignore[attr-defined]
    cls.__record_defaults__ = defaults  # type: ignore[attr-defined]
    cls.__match_args__ = names  # type: ignore[attr-defined,misc]
    cls.__init__ = _init  # type: ignore[misc]
    if "__repr__" not in cls.__dict__:
        cls.__repr__ = _repr  # type: ignore[assignment,method-assign]
    cls.__eq__ = _eq  # type: ignore[assignment,method-assign]
    if frozen:
        cls.__hash__ = _hash  # type: ignore[assignment,method-assign]
        cls.__setattr__ = _frozen_setattr  # type: ignore[assignment,method-assign]
        cls.__delattr__ = _frozen_delattr  # type: ignore[assignment,method-assign]
    else:
        cls.__hash__ = None  # type: ignore[assignment]  # mutable and compared by value: unhashable
    return cls


if TYPE_CHECKING:
    @overload
    def record(cls: C, /) -> C: ...
    @overload
    def record(*, frozen: bool = True) -> Callable[[C], C]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: C | None = None, /, *, frozen: bool = True) -> C | Callable[[C], C]:
    """Make ``cls`` a record (see the module docstring); ``@record`` or ``@record(frozen=False)``."""
    if cls is None:
        return lambda c: _make_record(c, frozen)
    return _make_record(cls, frozen)
