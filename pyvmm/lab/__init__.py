"""The KVM lab: run a command where ``/dev/kvm`` behaves like hardware, even on a software-KVM host.

``python -m pyvmm.lab run -- COMMAND [ARG...]`` starts QEMU (TCG, an emulated AMD CPU with SVM and
nested paging) with the lab kernel, the host's ``/`` read-only over 9p and a writable scratch directory,
runs the command there with the same interpreter, environment and working directory, streams its output
and returns its exit status.  See :mod:`pyvmm.lab.qemu` and the README's "KVM lab" section.
"""

from __future__ import annotations

from pyvmm.lab.qemu import (
    STATUS_LAB_FAILED,
    STATUS_TIMEOUT,
    LabError,
    LabOptions,
    LabResult,
    in_lab,
    run,
    unavailable_reason,
)

__all__ = [
    "STATUS_LAB_FAILED",
    "STATUS_TIMEOUT",
    "LabError",
    "LabOptions",
    "LabResult",
    "in_lab",
    "run",
    "unavailable_reason",
]
