"""pyvmm: a small full-system VMM in Python on Linux KVM.

The Python API (:class:`VM`, :class:`Console`, ...) lives in :mod:`pyvmm.api`; it is imported on first
use, so ``import pyvmm`` (and the CLI) stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"

TYPE_CHECKING = False  # typing's own, without importing typing (pyvmm.statictypes)
if TYPE_CHECKING:
    from typing import Any

    from pyvmm.api import (
        VM,
        CommandResult,
        Console,
        ConsoleEOF,
        ConsoleError,
        ConsoleTimeout,
        GuestCommandError,
        VmTimeout,
    )

__all__ = ["VM", "CommandResult", "Console", "ConsoleEOF", "ConsoleError", "ConsoleTimeout", "GuestCommandError",
           "VmTimeout", "__version__"]


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "__version__":
        from pyvmm import api

        return getattr(api, name)
    raise AttributeError(f"module 'pyvmm' has no attribute {name!r}")
