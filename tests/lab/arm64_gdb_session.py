"""Run inside the arm64 KVM lab by tests/lab/test_arm64_gdb_lab.py: ``pyvmm run --gdb --gdb-wait`` on the
arm64 guest kernel, driven by the tests' own protocol client (tests/gdbclient.py), each finding printed as
one ``ARM64-GDB:`` line for the host side to check.

The guest kernel's first instructions (arch/arm64/kernel/head.S, Linux 6.1): the Image starts with a NOP
(``efi_signature_nop``) and ``b primary_entry``; ``primary_entry`` calls ``preserve_boot_args`` and then
``init_kernel_el``, which both return to the next instruction, with the MMU still off (virtual =
physical).  So: read the registers and the code at the entry, step twice (into ``primary_entry``), stop at a
software breakpoint after the first call and at a hardware breakpoint after the second, then let the
kernel run, stop it with Ctrl-C where it runs with its page tables, read the code there through them,
detach, and the kernel goes on to its panic (no root device) and, 5 s later, its reboot.

Usage: python3 -m tests.lab.arm64_gdb_session IMAGE VA_BITS CONSOLE PORT
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.gdbclient import GdbClient, stop_fields

PC, CPSR = 32, 33
G_BYTES = 31 * 8 + 8 + 8 + 4 + 32 * 16 + 4 + 4  # x0-x30, sp, pc, cpsr, v0-v31, fpsr, fpcr


def kimage_vaddr(va_bits: int) -> int:
    """arch/arm64/include/asm/memory.h (6.1): KIMAGE_VADDR = MODULES_END = _PAGE_END(VA_BITS_MIN) + 128 MiB,
    with _PAGE_END(va) = -(1 << (va - 1)); the Image's first byte is there (no KASLR)."""
    return (1 << 64) - (1 << (va_bits - 1)) + (128 << 20)


def say(key: str, value: object) -> None:
    print(f"ARM64-GDB: {key} {value}", flush=True)


def session(c: GdbClient, image: bytes, va_bits: int) -> None:
    features = c.ask("qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=aarch64")
    xml = c.ask("qXfer:features:read:target.xml:0,ffff")
    say("xml", "aarch64" if "<architecture>aarch64</architecture>" in xml and 'name="cpsr"' in xml else xml[:120])
    say("hwbreak-supported", "hwbreak+" in features)
    say("stop", stop_fields(c.ask("?"))["signal"])
    regs = bytes.fromhex(c.ask("g"))
    say("g-bytes", len(regs) == G_BYTES)
    pc0 = c.register(PC)
    say("entry-code", c.read_memory(pc0, 8) == image[:8].hex())
    say("entry-cpsr", hex(c.register(CPSR) & 0xF))  # EL1h at the kernel's entry
    c.ask("vCont;s:1")
    pc1 = c.register(PC)
    c.ask("vCont;s:1")
    pc2 = c.register(PC)  # primary_entry: where the branch at the Image's second word leads
    branch = int.from_bytes(image[4:8], "little")
    say("steps", pc1 == pc0 + 4 and pc2 == pc1 + 4 * ((branch & 0x3FFFFFF) - ((branch & 0x2000000) << 1)))
    sw = pc2 + 4
    say("Z0", c.ask(f"Z0,{sw:x},4"))
    stop = stop_fields(c.ask("vCont;c", timeout=60))
    say("swbreak", "swbreak" in stop and c.register(PC) == sw)
    say("z0", c.ask(f"z0,{sw:x},4"))
    say("code-under-breakpoint", c.read_memory(sw, 4) == image[sw - pc0:sw - pc0 + 4].hex())
    hw = pc2 + 8
    say("Z1", c.ask(f"Z1,{hw:x},4"))
    stop = stop_fields(c.ask("vCont;c", timeout=60))
    say("hwbreak", "hwbreak" in stop and c.register(PC) == hw)
    say("z1", c.ask(f"z1,{hw:x},4"))
    c.send("vCont;c")
    time.sleep(1)  # the kernel turns its MMU on within its first milliseconds, and panics seconds later
    c.interrupt()
    stop = stop_fields(c.reply(timeout=60))
    pc = c.register(PC)
    offset = pc - kimage_vaddr(va_bits)
    say("interrupt", stop["signal"])
    say("interrupted-in-the-kernel-image", 0 <= offset < len(image))
    say("code-through-page-tables", 0 <= offset < len(image) and c.read_memory(pc, 4) == image[offset:offset + 4].hex())
    say("detach", c.ask("D"))


def main(image_path: str, va_bits: str, console: str, port: str) -> int:
    image = Path(image_path).read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "--kernel", image_path, "--memory", "128M",
                             "--gdb", f"127.0.0.1:{port}", "--gdb-wait", "--timeout", "240", "--no-panic-exit",
                             "--console", f"file:{console}", "--cmdline", "console=ttyS0 root=/dev/vdz panic=5"])
    try:
        c = GdbClient(int(port), timeout=120)
        try:
            session(c, image, int(va_bits))
        finally:
            c.close()
        say("exit", proc.wait(timeout=240))
    finally:
        if proc.poll() is None:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
