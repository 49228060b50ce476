"""Detect a host KVM that emulates guest kernel code in software, and what to do about it.

See docs/hosts.md.  On such a host (the ``kvm_pvm`` module, as on our development and CI machines)
guest CPL0 code runs through KVM's instruction emulator, which lacks a few instructions.  pyvmm then
(1) turns on the emulation assist and (2) appends kernel arguments that keep Linux away from the
instructions the assist cannot perform.  On a hardware KVM neither happens.
"""

from __future__ import annotations

import os

from pyvmm.statictypes import NamedTuple

SOFTWARE_KVM_MODULES = ("kvm_pvm",)

# Kernel arguments for a software-emulating host.  Each one, and why:
#   clearcpuid=...   features whose instructions the emulator lacks (cmpxchg16b in SLUB, popcnt in
#                    hweight, clac/stac with SMAP, rdrand/rdseed, fsgsbase, rdpid, AVX/BMI/MOVBE code
#                    paths, invpcid/pcid TLB flushes)
#   noxsave          no XSAVE/XRSTOR in FPU init (the emulator has neither)
#   tsc=reliable     skip the TSC watchdog: emulation makes TSC look unstable against other clocks
#   no_timer_check   skip the IO-APIC timer check (slow under emulation; the PIT is in-kernel anyway)
SOFTWARE_KVM_CMDLINE = (
    "clearcpuid=cx16,popcnt,smap,rdrand,rdseed,fsgsbase,rdpid,avx,avx2,bmi1,bmi2,movbe,invpcid,pcid",
    "noxsave",
    "tsc=reliable",
    "no_timer_check",
)


class HostKvm(NamedTuple):
    software: bool
    reason: str

    @property
    def workaround_args(self) -> tuple[str, ...]:
        return SOFTWARE_KVM_CMDLINE if self.software else ()


def detect(sys_module: str = "/sys/module") -> HostKvm:
    for name in SOFTWARE_KVM_MODULES:
        if os.path.exists(os.path.join(sys_module, name)):
            return HostKvm(True, f"host KVM is the software-emulating {name} module")
    return HostKvm(False, "host KVM uses hardware virtualization")


def resolve(mode: str, sys_module: str = "/sys/module") -> HostKvm:
    """``mode`` is the ``--workarounds`` option: auto (detect), on, off."""
    if mode == "on":
        return HostKvm(True, "workarounds forced on (--workarounds on)")
    if mode == "off":
        return HostKvm(False, "workarounds forced off (--workarounds off)")
    return detect(sys_module)
