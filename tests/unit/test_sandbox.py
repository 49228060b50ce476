"""The seccomp sandbox: its constants and syscall numbers against the installed C headers, the filter
program run by a small classic-BPF interpreter written here from linux/filter.h, and the real filter
installed in a child process."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyvmm import sandbox as sb

# -- against the headers ----------------------------------------------------------------------------
CONSTANTS = ["SECCOMP_SET_MODE_FILTER", "SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_RET_KILL_PROCESS",
             "SECCOMP_RET_ERRNO", "SECCOMP_RET_ALLOW", "BPF_MAXINSNS", "PR_SET_NO_NEW_PRIVS", "CLONE_THREAD"]


def _probe(tmp_path: Path, includes: list[str], names: list[str], name: str, *, defines: tuple[str, ...] = ()
           ) -> dict[str, int]:
    """Each C expression in ``names`` as the headers evaluate it (keys: the expression, spaces removed)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (gcc/cc) on PATH")
    lines = ["#include <stdio.h>", *(f"#define {d}" for d in defines), *(f"#include <{h}>" for h in includes),
             "int main(void) {"]
    lines += [f'  printf("{n.replace(" ", "")} %llu\\n", (unsigned long long)({n}));' for n in names]
    lines += ["  return 0;", "}"]
    src, exe = tmp_path / f"{name}.c", tmp_path / name
    src.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([cc, "-o", str(exe), str(src)], capture_output=True, text=True, check=False)
    if proc.returncode:
        pytest.fail(proc.stderr)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.needs_cc
def test_constants_match_the_headers(tmp_path: Path) -> None:
    c = _probe(tmp_path, ["linux/seccomp.h", "linux/filter.h", "linux/prctl.h", "linux/sched.h",
                          "linux/audit.h", "sys/syscall.h"],
               [*CONSTANTS, "AUDIT_ARCH_X86_64", "AUDIT_ARCH_AARCH64", "sizeof(struct sock_filter)",
                "sizeof(struct seccomp_data)", "__builtin_offsetof(struct seccomp_data, arch)",
                "__builtin_offsetof(struct seccomp_data, args)"], "consts")
    assert {n: c[n] for n in CONSTANTS} == {n: getattr(sb, n) for n in CONSTANTS}
    assert (c["AUDIT_ARCH_X86_64"], c["AUDIT_ARCH_AARCH64"]) == (sb.X86_64.audit_arch, sb.AARCH64.audit_arch)
    assert c["sizeof(structsock_filter)"] == struct.calcsize("=HBBI") == 8
    assert c["__builtin_offsetof(structseccomp_data,arch)"] == sb.DATA_ARCH
    assert c["__builtin_offsetof(structseccomp_data,args)"] == sb.DATA_ARGS
    assert c["sizeof(structseccomp_data)"] == sb.DATA_ARGS + 6 * 8


@pytest.mark.needs_cc
@pytest.mark.parametrize(("abi", "header"), [(sb.X86_64, "asm/unistd_64.h"), (sb.AARCH64, "asm-generic/unistd.h")])
def test_syscall_numbers_match_the_headers(tmp_path: Path, abi: sb.Abi, header: str) -> None:
    if abi is sb.X86_64 and os.uname().machine != "x86_64":
        pytest.skip("asm/unistd_64.h is the x86-64 host's")
    names = {**abi.refused, "seccomp": abi.seccomp, "clone": abi.clone, "clone3": abi.clone3}
    # arm64's asm/unistd.h defines __ARCH_WANT_SYS_CLONE3 before it includes the generic table
    c = _probe(tmp_path, [header], [f"__NR_{n}" for n in names], abi.name,
               defines=("__ARCH_WANT_SYS_CLONE3",) if abi is sb.AARCH64 else ())
    assert {n: c[f"__NR_{n}"] for n in names} == names


# -- the program, run ---------------------------------------------------------------------------------
def run_bpf(program: bytes, data: bytes) -> int:
    """A classic BPF interpreter for what the filter uses (linux/filter.h: BPF_LD|W|ABS, BPF_JMP with
    JEQ/JGE/JSET and K, BPF_RET|K), over ``struct seccomp_data`` bytes."""
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:
            acc = struct.unpack_from("=I", data, k)[0]
        elif code & 0x07 == 0x05:
            op = code & 0xF0
            taken = acc == k if op == 0x10 else acc >= k if op == 0x30 else bool(acc & k) if op == 0x40 else None
            assert taken is not None and code & 0x08 == 0, f"unexpected opcode {code:#x}"
            pc += jt if taken else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


def seccomp_data(nr: int, arch: int, *args: int) -> bytes:
    return struct.pack("=iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))


@pytest.mark.parametrize("abi", [sb.X86_64, sb.AARCH64])
def test_the_filter_refuses_what_it_says(abi: sb.Abi) -> None:
    prog = sb.build_filter(abi)
    assert len(prog) % 8 == 0 and len(prog) // 8 <= sb.BPF_MAXINSNS
    eperm, enosys = sb.SECCOMP_RET_ERRNO | errno.EPERM, sb.SECCOMP_RET_ERRNO | errno.ENOSYS

    def verdict(nr: int, *args: int, arch: int = abi.audit_arch) -> int:
        return run_bpf(prog, seccomp_data(nr, arch, *args))

    for name, nr in abi.refused.items():
        assert verdict(nr) == eperm, name
    allowed = set(range(0, 460)) - set(abi.refused.values()) - {abi.clone, abi.clone3}
    assert all(verdict(nr) == sb.SECCOMP_RET_ALLOW for nr in allowed)
    assert verdict(abi.clone3) == enosys  # glibc then falls back to clone
    thread_flags = 0x3D0F00  # what glibc's pthread_create passes (CLONE_VM|CLONE_FS|...|CLONE_THREAD|...)
    assert verdict(abi.clone, thread_flags) == sb.SECCOMP_RET_ALLOW
    assert verdict(abi.clone, 0x11) == eperm  # fork(): SIGCHLD
    assert verdict(abi.clone, 0x4111) == eperm  # vfork-style: CLONE_VM | CLONE_VFORK | SIGCHLD
    assert verdict(abi.clone, sb.CLONE_THREAD << 32) == eperm  # only the low 32 bits are the flags
    other = sb.AARCH64.audit_arch if abi is sb.X86_64 else sb.X86_64.audit_arch
    assert verdict(0, arch=other) == sb.SECCOMP_RET_KILL_PROCESS
    assert verdict(0, arch=0x40000003) == sb.SECCOMP_RET_KILL_PROCESS  # i386
    if abi.x32_bit:
        assert verdict(sb.X32_SYSCALL_BIT | 59) == sb.SECCOMP_RET_KILL_PROCESS  # x32 execve


# -- installed for real, in a child --------------------------------------------------------------------
CHILD = textwrap.dedent("""\
    import ctypes, errno, os, socket, subprocess, threading
    from pyvmm import sandbox
    libc = ctypes.CDLL(None, use_errno=True)
    def unshare():
        if libc.unshare(0x00020000) != 0 and ctypes.get_errno() == errno.EPERM:  # CLONE_NEWNS
            raise PermissionError
    print("installed", sandbox.install())
    done = []
    t = threading.Thread(target=done.append, args=(1,)); t.start(); t.join()
    print("thread", done == [1])
    for name, call in (("execve", lambda: os.execv("/bin/true", ["true"])), ("fork", os.fork),
                       ("subprocess", lambda: subprocess.run(["true"])), ("socket", socket.socket),
                       ("unshare", unshare)):
        try:
            call()
            print(name, "allowed")
        except PermissionError:
            print(name, "refused")
    with open(os.devnull, "w") as f:
        print("open", f.write("x") == 1)
""")


def test_installed_filter_bites_and_threads_still_start() -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False)
    if "SandboxError" in proc.stderr:  # a kernel without CONFIG_SECCOMP_FILTER, or a container forbidding it
        pytest.skip(f"seccomp filters unavailable here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("installed ") and lines[1:] == [
        "thread True", "execve refused", "fork refused", "subprocess refused", "socket refused", "unshare refused",
        "open True"]
