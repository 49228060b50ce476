"""A guest kernel that panics never passes: with ``panic=-1`` (reboot at once), ``panic=1`` (reboot after a
second) or ``panic=0`` (hang), pyvmm exits with status 3 and says why.  The default kernel is booted with no
initrd and a root device that does not exist, so it panics when it tries to mount its root.  Its pvpanic
driver (bound to the DSDT's QEMU0001 device) reports the panic, so the verdict does not rest on the console
text.  On a KVM that runs like hardware (marker ``lab``) each boot takes seconds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.status import ExitStatus
from tests.lab.conftest import BOOT_S, Guest, bound_for, vm_timeout

PANIC_TIMEOUT_S = vm_timeout(BOOT_S)
SETTINGS = ("-1", "1", "0")


@pytest.mark.lab(bound_s=bound_for(*[PANIC_TIMEOUT_S] * len(SETTINGS)))
def test_a_panicking_kernel_exits_3_whatever_its_panic_setting(pyvmm_run: Callable[..., Guest],
                                                               images: Path) -> None:
    for setting in SETTINGS:
        g = pyvmm_run("--kernel", str(images / "vmlinux"), "--memory", "128M",
                      "--cmdline", f"console=ttyS0 root=/dev/vdz panic={setting}", timeout=PANIC_TIMEOUT_S)
        assert "Kernel panic - not syncing" in g.console, (setting, g.explain())
        assert g.status == ExitStatus.GUEST_PANIC, (setting, g.explain())
        assert "guest kernel panic: " in g.stderr, (setting, g.explain())
        assert "reported by pvpanic (panicked)" in g.stderr, (setting, g.explain())
