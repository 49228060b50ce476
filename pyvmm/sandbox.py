"""The seccomp sandbox: what a running VMM may no longer ask of the kernel.

Once the VM is built (files opened, memory mapped, KVM objects created) and before the first
``KVM_RUN``, ``pyvmm run`` installs a seccomp filter (Documentation/userspace-api/seccomp_filter.rst) on
every thread of the process (``SECCOMP_FILTER_FLAG_TSYNC``; threads started later inherit it).  A device
model that a guest manages to steer then still cannot start programs, fork, trace or mount, load kernel
code or open sockets.  Refused calls fail with ``EPERM``, so the Python code that tried gets a
:class:`PermissionError` and pyvmm's verdict names the sandbox.

Refused (``SECCOMP_RET_ERRNO | EPERM``): :data:`REFUSED` below, and ``clone`` without ``CLONE_THREAD``
(a new process; a new thread is fine).  ``clone3`` passes its flags in memory a filter cannot read, so it
fails with ``ENOSYS``, and glibc's ``pthread_create`` falls back to ``clone`` as on kernels before 5.3.  A
call made with another architecture's ABI (x86's 32-bit or x32 entry points) kills the process: it
would bypass the numbers checked here.  Everything else is allowed: this is a denylist of what a VMM
never needs after start-up, not a full allowlist (Firecracker's is one, per thread; a Python
interpreter's needs are much wider).

The filter is classic BPF over ``struct seccomp_data`` (linux/seccomp.h); the constants and syscall
numbers are checked against the installed headers by tests/unit/test_sandbox.py.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from pyvmm.statictypes import NamedTuple

# linux/seccomp.h
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
DATA_NR = 0
DATA_ARCH = 4
DATA_ARGS = 16
# linux/bpf_common.h: classic BPF opcodes
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JMP_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JMP_JGE_K = 0x05 | 0x30 | 0x00  # BPF_JMP | BPF_JGE | BPF_K
BPF_JMP_JSET_K = 0x05 | 0x40 | 0x00  # BPF_JMP | BPF_JSET | BPF_K
BPF_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
BPF_MAXINSNS = 4096
# linux/prctl.h, linux/sched.h
PR_SET_NO_NEW_PRIVS = 38
CLONE_THREAD = 0x00010000
X32_SYSCALL_BIT = 0x40000000  # arch/x86/include/uapi/asm/unistd.h


class Abi(NamedTuple):
    """One architecture's system call ABI: its audit arch (linux/audit.h) and syscall numbers."""

    name: str
    audit_arch: int
    seccomp: int  # __NR_seccomp
    clone: int
    clone3: int
    refused: dict[str, int]
    x32_bit: bool = False  # x86-64: numbers with X32_SYSCALL_BIT are the x32 ABI


# What a VMM never needs once the VM runs.  x86-64: arch/x86/entry/syscalls/syscall_64.tbl
# (asm/unistd_64.h); aarch64 uses the generic table (asm-generic/unistd.h), which has no fork or vfork.
X86_64 = Abi("x86_64", 0xC000003E, seccomp=317, clone=56, clone3=435, x32_bit=True, refused={
    "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "ptrace": 101, "process_vm_readv": 310,
    "process_vm_writev": 311, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "setns": 308,
    "unshare": 272, "fsopen": 430, "fsmount": 432, "open_tree": 428, "move_mount": 429, "kexec_load": 246,
    "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176, "bpf": 321,
    "perf_event_open": 298, "socket": 41, "socketpair": 53, "reboot": 169, "swapon": 167, "swapoff": 168,
    "acct": 163, "add_key": 248, "request_key": 249, "keyctl": 250, "personality": 135, "userfaultfd": 323,
})
AARCH64 = Abi("aarch64", 0xC00000B7, seccomp=277, clone=220, clone3=435, refused={
    "execve": 221, "execveat": 281, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
    "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "setns": 268, "unshare": 97, "fsopen": 430,
    "fsmount": 432, "open_tree": 428, "move_mount": 429, "kexec_load": 104, "kexec_file_load": 294,
    "init_module": 105, "finit_module": 273, "delete_module": 106, "bpf": 280, "perf_event_open": 241,
    "socket": 198, "socketpair": 199, "reboot": 142, "swapon": 224, "swapoff": 225, "acct": 89,
    "add_key": 217, "request_key": 218, "keyctl": 219, "personality": 92, "userfaultfd": 282,
})
ABIS = {abi.name: abi for abi in (X86_64, AARCH64)}


class SandboxError(OSError):
    """The kernel would not install the filter."""


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)  # struct sock_filter (linux/filter.h)


def build_filter(abi: Abi) -> bytes:
    """The filter program, as an array of ``struct sock_filter``."""
    eperm = SECCOMP_RET_ERRNO | errno.EPERM
    prog = [
        _insn(BPF_LD_W_ABS, DATA_ARCH),
        _insn(BPF_JMP_JEQ_K, abi.audit_arch, jt=1),
        _insn(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        _insn(BPF_LD_W_ABS, DATA_NR),
    ]
    if abi.x32_bit:
        prog += [_insn(BPF_JMP_JGE_K, X32_SYSCALL_BIT, jf=1), _insn(BPF_RET_K, SECCOMP_RET_KILL_PROCESS)]
    for nr in sorted(set(abi.refused.values())):
        prog += [_insn(BPF_JMP_JEQ_K, nr, jf=1), _insn(BPF_RET_K, eperm)]
    prog += [
        _insn(BPF_JMP_JEQ_K, abi.clone3, jf=1),
        _insn(BPF_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS),
        _insn(BPF_JMP_JEQ_K, abi.clone, jf=4),
        _insn(BPF_LD_W_ABS, DATA_ARGS),  # the low half of args[0], the flags (little-endian hosts)
        _insn(BPF_JMP_JSET_K, CLONE_THREAD, jf=1),
        _insn(BPF_RET_K, SECCOMP_RET_ALLOW),
        _insn(BPF_RET_K, eperm),
        _insn(BPF_RET_K, SECCOMP_RET_ALLOW),
    ]
    if len(prog) > BPF_MAXINSNS:
        raise ValueError(f"seccomp filter of {len(prog)} instructions")
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))  # struct sock_fprog


def host_abi() -> Abi:
    machine = os.uname().machine
    if machine not in ABIS:
        raise SandboxError(errno.ENOSYS, f"no seccomp filter for {machine}")
    return ABIS[machine]


def install(abi: Abi | None = None) -> int:
    """Install the filter on every thread of this process; return the number of refused system calls.

    Irreversible: the process can never leave the sandbox.  Raises :class:`SandboxError`.
    """
    abi = abi or host_abi()
    program = build_filter(abi)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    # Without CAP_SYS_ADMIN a filter needs no_new_privs (a setuid program could not be confused by it).
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SandboxError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    rc = libc.syscall(abi.seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(fprog))
    if rc != 0:
        err = ctypes.get_errno() if rc < 0 else errno.EBUSY
        why = os.strerror(err) if rc < 0 else f"thread {rc} could not be synchronised"
        raise SandboxError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {why}")
    return len(abi.refused) + 2  # + clone without CLONE_THREAD, clone3
