"""How a VM ended, as the process exit status.  Documented in ``pyvmm run --help`` and the README."""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    OK = 0  # the guest powered off or rebooted (i8042 reset, triple fault, PSCI/ACPI off)
    VMM_ERROR = 1  # pyvmm itself failed while the VM ran (a bug, or a KVM call that failed)
    BAD_INPUT = 2  # host-side input was wrong: options, files, /dev/kvm access (nothing ran)
    GUEST_PANIC = 3  # the guest kernel panicked (seen on its console)
    EMULATION_FAILURE = 4  # the host KVM could not emulate an instruction and neither could the assist
    TIMEOUT = 5  # --timeout expired before the guest ended
    STOPPED = 6  # stopped from the host: SIGINT, SIGTERM, SIGHUP or the console escape
    NO_GUEST_STATUS = 7  # --exec: the guest ended without reporting the command's status


# pyvmm's own statuses are 0-31 (0-7 used).  A status N the guest reports through the guest exit device
# (pyvmm/devices/guestexit.py; --exec reports the command's) becomes GUEST_STATUS_BASE + N, so that it
# cannot be taken for one of pyvmm's own: `exit 3` in the guest is 35, never "the guest panicked".  0 stays
# 0 (the guest says all is well, and so does pyvmm), and N >= 223 all become 255.  The exact N is in the
# last line pyvmm prints, in the API's results and in the log.
GUEST_STATUS_BASE = 32
GUEST_STATUS_MAX_EXACT = 255 - GUEST_STATUS_BASE - 1  # 222: the last N with a status of its own


def guest_exit_code(guest_status: int) -> int:
    """The process exit status for a status the guest reported (0-255)."""
    if not 0 <= guest_status <= 255:
        raise ValueError(f"a guest status is 0-255, not {guest_status}")
    if guest_status == 0:
        return 0
    return min(GUEST_STATUS_BASE + guest_status, 255)


def guest_status_of(code: int) -> int | None:
    """The guest status an exit status stands for, if it is one (255: 223 or more, so None); else None."""
    if GUEST_STATUS_BASE < code < 255:
        return code - GUEST_STATUS_BASE
    return None


STATUS_HELP = "\n".join(
    f"  {s.value}  {text}"
    for s, text in (
        (ExitStatus.OK, "the guest powered off or rebooted"),
        (ExitStatus.VMM_ERROR, "pyvmm failed while the VM ran"),
        (ExitStatus.BAD_INPUT, "bad host-side input (options, files, /dev/kvm); nothing ran"),
        (ExitStatus.GUEST_PANIC, "the guest kernel panicked"),
        (ExitStatus.EMULATION_FAILURE, "unhandled emulation failure (RIP and bytes are printed)"),
        (ExitStatus.TIMEOUT, "--timeout expired"),
        (ExitStatus.STOPPED, "stopped from the host (SIGINT/SIGTERM/SIGHUP or the console escape Ctrl-A x)"),
        (ExitStatus.NO_GUEST_STATUS, "--exec: the guest ended without reporting the command's status"),
    )
) + f"""
  {GUEST_STATUS_BASE}+N  the guest reported status N (1-{GUEST_STATUS_MAX_EXACT}) through the guest exit device, e.g.
        the --exec command's; 255 for N >= {GUEST_STATUS_MAX_EXACT + 1}; a reported 0 is 0"""
