"""Boot tests: real Linux boots of the default guest (minutes each on a software-emulating host KVM).

They use pyvmm's own Python API and pytest plugin (``vm_factory``; options ``--pyvmm-kernel``,
``--pyvmm-initrd``, ``--pyvmm-disk``, ``--pyvmm-memory``): a failing test's report carries pyvmm's log and
the guest console tail.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyvmm import VM
from pyvmm.arch.x86_64 import hostkvm

BOOT_TIMEOUT_S = 600  # a bound, not a benchmark: ~90 s here, well under a second on hardware

Boot = Callable[..., VM]


@pytest.fixture(scope="session")
def software_kvm() -> bool:
    return hostkvm.detect().software


@pytest.fixture
def boot(vm_factory: Callable[..., VM], images: Path, kvm: None) -> Boot:
    """``boot(**VM_kwargs) -> VM``: start a VM and return it once it has ended (``vm.status`` is set)."""

    def run(*, timeout: float = BOOT_TIMEOUT_S, **kwargs: Any) -> VM:
        vm = vm_factory(timeout=timeout, **kwargs)
        vm.wait(timeout + 60)
        print(vm.explain())  # shown by pytest with -s (a failure report has it anyway)
        return vm

    return run
