"""pytest plugin for boot tests with :class:`pyvmm.VM` (registered as the ``pyvmm`` pytest11 entry point).

Fixtures:

``vm_factory``
    ``vm_factory(**kwargs) -> VM``: a started VM with the session's kernel, initrd, memory and timeout
    unless given (``initrd=None`` drops the initrd); ``start=False`` returns it unstarted.  Every VM is
    stopped and cleaned up after the test.
``booted_vm``
    The default guest booted to a shell on its console (``init=/bin/sh`` on the ``--pyvmm-disk`` root,
    or ``rdinit=/bin/sh`` on the initrd), ready for ``booted_vm.run("uname -r")``.  It needs guest user
    space: on a software-emulating host KVM (host-kvm.md) it skips; run it in the KVM lab or on hardware.
``pyvmm_images``
    The session's :class:`PyvmmImages` (what the options below resolved to).

Options: ``--pyvmm-kernel``, ``--pyvmm-initrd``, ``--pyvmm-disk`` (a root disk image; tests get a copy),
``--pyvmm-memory``, ``--pyvmm-timeout``.  They default to the built default guest in ``images/out/``
under pytest's root directory when it is there.

When a test that used a VM fails, its report gets a section per VM with pyvmm's log and the console tail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyvmm.api import VM

DEFAULT_MEMORY = "256M"
DEFAULT_TIMEOUT_S = 600.0  # a bound, not a benchmark: a boot takes ~1-2 min on a software KVM, <1 s on hardware
SHELL_TIMEOUT_S = 300.0
TAIL_LINES = 40
_VMS = pytest.StashKey[list[VM]]()


@dataclass(frozen=True)
class PyvmmImages:
    """The guest under test, from the command line or ``images/out/``."""

    kernel: Path | None
    initrd: Path | None
    disk: Path | None
    memory: str
    timeout: float


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyvmm", "pyvmm boot tests")
    group.addoption("--pyvmm-kernel", metavar="PATH", help="kernel under test (default: images/out/vmlinux)")
    group.addoption("--pyvmm-initrd", metavar="PATH", help="initrd (default: images/out/initrd.cpio.gz)")
    group.addoption("--pyvmm-disk", metavar="PATH",
                    help="root disk image; each test boots a copy (default: images/out/rootfs.ext4)")
    group.addoption("--pyvmm-memory", metavar="SIZE", default=DEFAULT_MEMORY,
                    help=f"guest RAM (default: {DEFAULT_MEMORY})")
    group.addoption("--pyvmm-timeout", metavar="SECONDS", type=float, default=DEFAULT_TIMEOUT_S,
                    help=f"pyvmm run --timeout for each VM (default: {DEFAULT_TIMEOUT_S:.0f})")


def _option_path(config: pytest.Config, name: str, default: str) -> Path | None:
    given = config.getoption(name)
    if given:
        return Path(given).absolute()
    path = config.rootpath / "images" / "out" / default
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def pyvmm_images(pytestconfig: pytest.Config) -> PyvmmImages:
    return PyvmmImages(
        kernel=_option_path(pytestconfig, "--pyvmm-kernel", "vmlinux"),
        initrd=_option_path(pytestconfig, "--pyvmm-initrd", "initrd.cpio.gz"),
        disk=_option_path(pytestconfig, "--pyvmm-disk", "rootfs.ext4"),
        memory=str(pytestconfig.getoption("--pyvmm-memory")),
        timeout=float(pytestconfig.getoption("--pyvmm-timeout")),
    )


def _kvm_missing() -> str | None:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return f"/dev/kvm cannot be opened: {err.strerror}"
    os.close(fd)
    return None


VmFactory = Callable[..., VM]


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest, pyvmm_images: PyvmmImages) -> Iterator[VmFactory]:
    """``vm_factory(*, start=True, **VM_kwargs) -> VM``, with the session's images as defaults."""
    reason = _kvm_missing()
    if reason:
        pytest.skip(reason)
    vms = request.node.stash.setdefault(_VMS, [])
    made: list[VM] = []

    def make(*, start: bool = True, **kwargs: Any) -> VM:
        if "kernel" not in kwargs:
            if pyvmm_images.kernel is None:
                pytest.skip("no kernel: pass --pyvmm-kernel or build the default guest (make images)")
            kwargs["kernel"] = pyvmm_images.kernel
        if "initrd" not in kwargs:
            kwargs["initrd"] = pyvmm_images.initrd
        kwargs.setdefault("memory", pyvmm_images.memory)
        kwargs.setdefault("timeout", pyvmm_images.timeout)
        kwargs.setdefault("name", f"vm{len(vms)}")
        vm = VM(**kwargs)
        vms.append(vm)
        made.append(vm)
        return vm.start() if start else vm

    yield make
    for vm in made:
        vm.close()


@pytest.fixture
def booted_vm(vm_factory: VmFactory, pyvmm_images: PyvmmImages, tmp_path: Path) -> VM:
    """The default guest with a shell on its console (needs a KVM that runs guest user space)."""
    from pyvmm.arch.x86_64 import hostkvm

    host = hostkvm.detect()
    if host.software and os.environ.get("PYVMM_IN_LAB") != "1":
        pytest.skip(f"{host.reason}: guest user space cannot run here (docs: host-kvm.md); "
                    "use the KVM lab (pyvmm.lab) or a hardware KVM")
    if pyvmm_images.disk is not None:
        root = tmp_path / "root.img"
        shutil.copyfile(pyvmm_images.disk, root)
        vm = vm_factory(initrd=None, disks=[str(root)], cmdline="console=ttyS0 root=/dev/vda rw init=/bin/sh")
    elif pyvmm_images.initrd is not None:
        vm = vm_factory(cmdline="console=ttyS0 rdinit=/bin/sh")
    else:
        pytest.skip("booted_vm needs a root disk (--pyvmm-disk) or an initrd (--pyvmm-initrd)")
    vm.console.wait_for_shell(timeout=SHELL_TIMEOUT_S)
    return vm


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed:
        return
    for vm in item.stash.get(_VMS, []):
        report.sections.append((f"pyvmm {vm.name}", vm.explain(TAIL_LINES)))
