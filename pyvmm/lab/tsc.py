"""The host's TSC frequency, measured, for the x86 lab kernel's ``tsc_early_khz=``.

Why the lab needs it: the lab kernel learns its TSC frequency by calibrating against the PIT (microvm
without ACPI offers no HPET or ACPI PM timer as a reference).  Under TCG that calibration times a busy
loop, and when this host is loaded the loop runs so slowly that it fails ("tsc: Unable to calibrate
against PIT", "Marking TSC unstable due to could not calculate TSC khz").  Linux then has ``tsc_khz ==
0``, and its KVM (arch/x86/kvm/x86.c, ``kvm_guest_time_update()``) answers every guest entry with a
fresh ``KVM_REQ_CLOCK_UPDATE`` instead of entering the guest: ``KVM_RUN`` spins in the kernel, the vCPU
never executes its first instruction, and only a signal gets it out.  Any VMM in such a lab stalls.

TCG's guest TSC is the host's own counter (QEMU reads the host TSC for ``rdtsc``), so the host's TSC
frequency is the lab's, and ``tsc_early_khz=`` (Documentation/admin-guide/kernel-parameters.txt) makes
the lab kernel skip the calibration.  The frequency is measured here with ``rdtsc`` against
``CLOCK_MONOTONIC_RAW`` rather than read from ``/proc/cpuinfo``, whose "cpu MHz" is the current core
clock on hosts with frequency scaling.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import platform
import statistics
import time
from collections.abc import Callable

# rdtsc; shl rdx, 32; or rax, rdx; ret  -- returns the 64-bit TSC in rax (System V ABI)
_RDTSC_CODE = bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3])
_PROT_READ, _PROT_EXEC = 0x1, 0x4
_WINDOW_S = 0.03
_ROUNDS = 5


@functools.cache
def _rdtsc() -> Callable[[], int] | None:
    """A callable that returns the TSC, or None where it cannot be had (another architecture, W^X)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    page.write(_RDTSC_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    libc = ctypes.CDLL(None, use_errno=True)
    # Write first, then make the page executable (and no longer writable): hosts that forbid W+X allow it.
    if libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(mmap.PAGESIZE), _PROT_READ | _PROT_EXEC) != 0:
        return None
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
    _keep.append(page)  # lifetime: the code page lives as long as the process may call it
    return lambda: int(fn())


_keep: list[mmap.mmap] = []


def _pair(rdtsc: Callable[[], int]) -> tuple[int, int]:
    """(TSC, ns) read as close together as this thread manages: the tightest of a few tries."""
    best: tuple[int, int, int] | None = None
    for _ in range(8):
        t0 = rdtsc()
        ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
        t1 = rdtsc()
        if best is None or t1 - t0 < best[0]:
            best = (t1 - t0, (t0 + t1) // 2, ns)
    assert best is not None
    return best[1], best[2]


def measure_tsc_khz() -> int | None:
    """The TSC frequency in kHz (median of a few 30 ms windows), or None where there is no TSC to read."""
    try:
        rdtsc = _rdtsc()
    except (OSError, ValueError, AttributeError):
        return None
    if rdtsc is None:
        return None
    rates = []
    for _ in range(_ROUNDS):
        tsc0, ns0 = _pair(rdtsc)
        time.sleep(_WINDOW_S)
        tsc1, ns1 = _pair(rdtsc)
        if ns1 > ns0 and tsc1 > tsc0:
            rates.append((tsc1 - tsc0) * 1_000_000 / (ns1 - ns0))
    return round(statistics.median(rates)) if rates else None


@functools.cache
def host_tsc_khz() -> int | None:
    """:func:`measure_tsc_khz`, once per process."""
    with contextlib.suppress(Exception):
        return measure_tsc_khz()
    return None
