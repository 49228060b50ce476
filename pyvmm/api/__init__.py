"""The Python API: a VM running in the background, and expect-style access to its serial console.

::

    from pyvmm import VM

    with VM(kernel="images/out/vmlinux", initrd="images/out/initrd.cpio.gz", memory="256M",
            cmdline="console=ttyS0 rdinit=/bin/sh", timeout=300) as vm:
        vm.console.wait_for_shell(timeout=120)
        status, output = vm.run("uname -r")
    print(vm.status, vm.console_tail())

How it works.  :meth:`VM.start` runs ``python -m pyvmm run --config <file> --console stdio`` as a child
process whose stdin/stdout are a pseudo-terminal: the guest's serial console.  A child process, not a
thread, because the vCPU kick needs a signal handler that only a main thread can install, and because a
process is cleanly isolated and always killable.  pyvmm's own messages (stderr) go to a separate log
(:attr:`VM.log`).  A reader thread drains the terminal all the time, so a guest that prints a lot never
blocks on a full pty while the test is busy elsewhere, and keeps the whole transcript
(:attr:`VM.console_text`).

The expect machinery is pexpect's: :class:`Console` drives any pexpect child (``pexpect.spawn("sh")``
stands in for a guest in the unit tests); for a VM the child is :class:`PtyChild`, a
:class:`pexpect.spawnbase.SpawnBase` fed by the reader thread.

:meth:`Console.run` needs a POSIX shell on the console (e.g. ``init=/bin/sh``; the default guest's
``/init`` runs its checks and reboots).  On a software-emulating host KVM guest user space cannot run at
all (docs: hosts.md), so there is no shell to talk to; use the KVM lab or a hardware KVM.
"""

from __future__ import annotations

from pyvmm.api.console import Console
from pyvmm.api.errors import (
    CommandResult,
    ConsoleEOF,
    ConsoleError,
    ConsoleTimeout,
    GuestCommandError,
    VmState,
    VmTimeout,
)
from pyvmm.api.pty import PtyChild
from pyvmm.api.vm import VM

__all__ = ["VM", "CommandResult", "Console", "ConsoleEOF", "ConsoleError", "ConsoleTimeout", "GuestCommandError",
           "PtyChild", "VmState", "VmTimeout"]
