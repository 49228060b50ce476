"""The exception hierarchy.

Host-side mistakes (a missing file, a bad size string, no access to /dev/kvm) raise a subclass of
:class:`VmmError`; the CLI prints ``str(err)`` as one line and exits with status 2.  Guest mistakes are
never exceptions that kill the VM: devices answer them with the status the spec gives.
"""

from __future__ import annotations


class VmmError(Exception):
    """Root of every error pyvmm raises on purpose."""


class ConfigError(VmmError):
    """Bad user input: option values, sizes, missing files."""


class KvmError(VmmError):
    """A KVM ioctl failed; the message names the ioctl and, where a person can act, a hint.  ``errno`` is
    the ioctl's error number where one failed (None otherwise)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class GuestMemoryError(VmmError):
    """An access outside guest RAM (from the host side; guest-originated ones are handled by devices)."""


class LoaderError(VmmError):
    """A kernel or initrd cannot be loaded: not a kernel, wrong architecture, too large, corrupt."""


class DeviceError(VmmError):
    """A device cannot be set up from the host side (disk image missing, locked, too small)."""
