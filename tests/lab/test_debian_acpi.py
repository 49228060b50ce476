"""Debian's stock cloud kernel finds pyvmm's virtio disk through ACPI and powers off through ACPI S5; its
pvpanic driver binds to the DSDT's QEMU0001 device and reports a panic.

That kernel has no ``virtio_mmio.device=`` support and virtio_mmio/virtio_blk as modules, so the
initramfs (``python images/debian_acpi.py``) loads them and vda can only come from the DSDT's LNRO0005
device; its /init then powers off, which must end the VM with status 0 (FADT sleep control register).
Needs a KVM that runs guest user space (marker ``lab``), and on this project's hosts minutes of
emulated boot otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.conftest import Guest, bound_for, vm_timeout

DEBIAN = Path(__file__).resolve().parents[2] / "images" / "out" / "debian-acpi"
# Debian's kernel to its initramfs' /init, which loads two modules and powers off: 23.7 s measured in the
# lab (docs/acpi.md); about 60 s under load.
DEBIAN_BOOT_S = 60.0
TIMEOUT_S = vm_timeout(DEBIAN_BOOT_S)


@pytest.fixture
def debian() -> Path:
    if not (DEBIAN / "vmlinuz").is_file() or not (DEBIAN / "initrd.cpio.gz").is_file():
        pytest.skip(f"{DEBIAN} is not prepared: run `python images/debian_acpi.py` (apt-get download)")
    return DEBIAN


@pytest.mark.lab(bound_s=bound_for(TIMEOUT_S))
@pytest.mark.parametrize("cpus", [1, 2])
def test_debian_kernel_finds_vda_via_acpi(pyvmm_run: Callable[..., Guest], debian: Path, images: Path,
                                          cpus: int) -> None:
    g = pyvmm_run("--kernel", str(debian / "vmlinuz"), "--initrd", str(debian / "initrd.cpio.gz"),
                  "--memory", "512M", "--cpus", str(cpus), "--devices-via", "acpi",
                  "--disk", f"path={images / 'rootfs.ext4'},readonly=on", "--cmdline", "console=ttyS0",
                  timeout=TIMEOUT_S)
    assert "virtio_mmio.device=" not in g.stderr, g.explain()
    assert "ACPI: RSDP 0x00000000000E0000" in g.console, g.explain()
    assert "ACPI: Interpreter enabled" in g.console, g.explain()
    assert "ACPI: PM: (supports S0 S5)" in g.console, g.explain()
    assert "PYVMM-DEB: vda found" in g.console and "LNRO0005:00" in g.console, g.explain()
    assert f"PYVMM-DEB: cpus online: {'0' if cpus == 1 else '0-1'}" in g.console, g.explain()
    assert "PYVMM-DEB: pvpanic devices: 1" in g.console, g.explain()  # bound to the DSDT's QEMU0001
    assert g.status == 0 and "guest powered off (ACPI S5)" in g.stderr, g.explain()


@pytest.mark.lab(bound_s=bound_for(TIMEOUT_S))
def test_debian_kernel_reports_its_panic_through_pvpanic(pyvmm_run: Callable[..., Guest], debian: Path) -> None:
    # The kernel crashes (sysrq c) with panic=-1: pvpanic's report, then the reset; the verdict is the panic.
    g = pyvmm_run("--kernel", str(debian / "vmlinuz"), "--initrd", str(debian / "initrd.cpio.gz"),
                  "--memory", "512M", "--devices-via", "acpi",
                  "--cmdline", "console=ttyS0 panic=-1 pyvmm.deb.crash=1", timeout=TIMEOUT_S)
    assert "PYVMM-DEB: pvpanic devices: 1" in g.console and "PYVMM-DEB: crashing" in g.console, g.explain()
    assert g.status == 3, g.explain()
    assert "reported by pvpanic (panicked)" in g.stderr, g.explain()
