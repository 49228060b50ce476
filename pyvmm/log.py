"""pyvmm's loggers: the standard ``logging`` package, imported when the first message is logged.

``logging`` and what it imports (traceback, linecache, tokenize, string) cost about 0.06 s of start-up in
the KVM lab, where every module counts towards command-to-guest time, and a normal ``pyvmm run`` logs
nothing before its first ``KVM_RUN``.  So modules take their logger from :func:`get_logger`, a stand-in
that hands each call to ``logging.getLogger(name)`` once there is a call, and the CLI's
:func:`configure` is applied then (at once if ``logging`` is already imported, as under pytest).
Messages, levels, names and handlers are logging's own: ``caplog`` and ``logging.getLogger("pyvmm.bus")``
see the same records as before.

Until something imports ``logging``, nothing can have configured it but :func:`configure`, so a message
below that level (or below WARNING, logging's default for the root logger, when nothing configured it) is
one logging would drop: the stand-in drops it without importing anything.
"""

from __future__ import annotations

import sys

from pyvmm.statictypes import TYPE_CHECKING

if TYPE_CHECKING:
    import logging
    from typing import Any

# logging's level numbers (Lib/logging/__init__.py), for callers that must not import it
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

FORMAT = "pyvmm: %(message)s"
_pending: dict[str, Any] | None = None  # basicConfig's arguments, until logging is imported


def configure(level: int) -> None:
    """What the CLI asks for: messages of ``level`` and above on stderr, as ``pyvmm: <message>``."""
    global _pending
    kwargs: dict[str, Any] = {"level": level, "format": FORMAT, "stream": sys.stderr}
    if "logging" in sys.modules:
        sys.modules["logging"].basicConfig(**kwargs)
    else:
        _pending = kwargs


def _dropped(level: int) -> bool:
    """Whether logging, were it imported now, would drop a message of ``level`` (see the module's doc)."""
    if "logging" in sys.modules:
        return False
    return level < (_pending["level"] if _pending is not None else WARNING)


def _logging() -> Any:
    global _pending
    import logging

    if _pending is not None:
        kwargs, _pending = _pending, None
        logging.basicConfig(**kwargs)
    return logging


class Logger:
    """``logging.getLogger(name)``, imported on the first call."""

    __slots__ = ("_real", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._real: logging.Logger | None = None

    @property
    def real(self) -> logging.Logger:
        if self._real is None:
            self._real = _logging().getLogger(self.name)
        return self._real

    def isEnabledFor(self, level: int) -> bool:  # logging's spelling
        return not _dropped(level) and self.real.isEnabledFor(level)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        if not _dropped(DEBUG):
            self.real.debug(msg, *args, **kwargs)

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        if not _dropped(INFO):
            self.real.info(msg, *args, **kwargs)

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        if not _dropped(WARNING):
            self.real.warning(msg, *args, **kwargs)

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.real.error(msg, *args, **kwargs)

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.real.exception(msg, *args, **kwargs)


def get_logger(name: str) -> Logger:
    return Logger(name)
