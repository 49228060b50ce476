"""``build_vm(config) -> Vmm``: the VM for this host's architecture, built by that architecture's builder.

Each architecture has one module with the same entry point, ``build(config, stack, report, console_fd)``
(pyvmm/builder_x86_64.py, pyvmm/builder_aarch64.py), a flat ordered script over the shared parts in
pyvmm/buildparts.py; this module picks one from :data:`BUILDERS` and never branches on the architecture
itself.  Resources go into one ExitStack so a failure half-way releases what was made, in reverse order.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable

from pyvmm.buildparts import CONSOLE_FROM_CONFIG, BuildReport, ConsoleFd
from pyvmm.config import VmConfig
from pyvmm.errors import ConfigError
from pyvmm.vmm import Vmm

# The host's architecture (KVM runs guests of its own kind) -> the module with its ``build``; imported
# only when used, so a host loads one architecture's code.
BUILDERS = {"x86_64": "pyvmm.builder_x86_64", "aarch64": "pyvmm.builder_aarch64"}


def build_vm(config: VmConfig, *, console_fd: ConsoleFd = CONSOLE_FROM_CONFIG) -> tuple[Vmm, BuildReport]:
    """Build (but do not start) the VM ``config`` describes.

    ``console_fd`` overrides where guest console output goes (``None`` = nowhere); by default it
    follows ``config.console``.
    """
    report = BuildReport()
    stack = contextlib.ExitStack()
    try:
        vmm = _build(config, stack, report, console_fd)
    except BaseException:
        stack.close()
        raise
    return vmm, report


def host_arch() -> str:
    """The architecture pyvmm builds machines for: the host's own (KVM runs guests of its own kind)."""
    return os.uname().machine


def _build(config: VmConfig, stack: contextlib.ExitStack, report: BuildReport, console_fd: ConsoleFd) -> Vmm:
    arch = host_arch()
    if arch not in BUILDERS:
        raise ConfigError(f"pyvmm builds {' and '.join(BUILDERS)} machines; this host is {arch}")
    build: Callable[[VmConfig, contextlib.ExitStack, BuildReport, ConsoleFd], Vmm] = importlib.import_module(
        BUILDERS[arch]).build
    return build(config, stack, report, console_fd)
