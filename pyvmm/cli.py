"""The ``pyvmm`` command line: argparse -> VmConfig -> build -> run.  No VM logic here.

Host-side errors print one line (``pyvmm: error: ...``) and exit with status 2; the VM's own ending is
the exit status documented in ``pyvmm run --help``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pyvmm import __version__
from pyvmm.config import DiskConfig, VmConfig, parse_memory
from pyvmm.errors import VmmError
from pyvmm.status import STATUS_HELP, ExitStatus
from pyvmm.vmm import print_err

RUN_EPILOG = f"""\
exit status:
{STATUS_HELP}

console:
  On a terminal the guest console is interactive (raw mode); press Ctrl-A x to stop the VM,
  Ctrl-A Ctrl-A to send Ctrl-A.  From a pipe, stdin is passed to the guest as is.

examples:
  pyvmm run --kernel images/out/vmlinux --initrd images/out/initrd.cpio.gz --memory 512M
  pyvmm run --kernel bzImage --disk path=rootfs.ext4 --cmdline "console=ttyS0 root=/dev/vda rw"
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvmm", description="A small VMM in Python on Linux KVM.")
    p.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser(
        "run",
        help="boot a Linux kernel",
        description="Boot an x86_64 Linux kernel (ELF vmlinux or bzImage) with an optional initrd and disks.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--kernel", required=True, type=Path, metavar="PATH",
                   help="ELF vmlinux or bzImage (the format is detected from the file)")
    r.add_argument("--initrd", type=Path, metavar="PATH", help="initramfs/initrd image")
    r.add_argument("--cmdline", default="console=ttyS0", metavar="TEXT",
                   help="kernel command line (default: %(default)s); pyvmm appends reboot=k pci=off "
                        "8250.nr_uarts=1 unless given, plus the devices and any host workarounds")
    r.add_argument("--memory", "-m", default="512M", metavar="SIZE",
                   help="guest RAM, e.g. 512M or 2G (default: %(default)s)")
    r.add_argument("--cpus", type=int, default=1, metavar="N", help="number of vCPUs (default: 1)")
    r.add_argument("--disk", action="append", default=[], metavar="SPEC",
                   help="virtio-blk disk: path=IMG[,readonly=on][,serial=ID][,cache=writeback|none]"
                        "[,discard=on|off]; repeat for vdb, vdc, ...")
    r.add_argument("--console", default="stdio", metavar="WHERE",
                   help="guest console: stdio (default), none, or file:PATH")
    r.add_argument("--boot", choices=("elf", "guest"), default="elf",
                   help="bzImage handling: elf = decompress on the host and boot the vmlinux inside (fast, "
                        "default); guest = run the kernel's own decompressor in the guest")
    r.add_argument("--workarounds", choices=("auto", "on", "off"), default="auto",
                   help="host-KVM workarounds (emulation assist, kernel args): auto = only on a software-"
                        "emulating host KVM (default)")
    r.add_argument("--timeout", type=float, metavar="SECONDS", help="stop the VM after this long (exit status 5)")
    r.add_argument("--no-panic-exit", action="store_true",
                   help="keep running after a guest kernel panic instead of stopping with status 3")
    r.add_argument("-v", "--verbose", action="count", default=0, help="more VMM messages on stderr (-vv: debug)")
    r.add_argument("-q", "--quiet", action="store_true", help="no VMM messages except errors")
    return p


def _config(args: argparse.Namespace) -> VmConfig:
    return VmConfig(
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.cmdline,
        memory=parse_memory(args.memory),
        cpus=args.cpus,
        disks=tuple(DiskConfig.parse(d) for d in args.disk),
        console=args.console,
        boot=args.boot,
        workarounds=args.workarounds,
        timeout=args.timeout,
        exit_on_panic=not args.no_panic_exit,
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="pyvmm: %(message)s", stream=sys.stderr)
    if args.command == "run":
        return _run(args)
    parser.error(f"unknown command {args.command}")
    return int(ExitStatus.BAD_INPUT)


def _run(args: argparse.Namespace) -> int:
    from pyvmm.runner import run_vm  # imports KVM bits only when running

    try:
        config = _config(args)
        return int(run_vm(config, quiet=args.quiet))
    except VmmError as err:
        print_err(f"error: {err}")
        return int(ExitStatus.BAD_INPUT)
    except KeyboardInterrupt:
        return int(ExitStatus.STOPPED)


if __name__ == "__main__":
    os._exit(main())
