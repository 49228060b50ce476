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
    )
)
