"""The ``pyvmm`` command line: argparse -> VmConfig -> build -> run.  No VM logic here.

Host-side errors print one line (``pyvmm: error: ...``) and exit with status 2; the VM's own ending is
the exit status documented in ``pyvmm run --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from pyvmm import __version__, log
from pyvmm.config import DEVICES_VIA
from pyvmm.configfile import FIELD_NAMES, RunSettings, format_size, resolve
from pyvmm.errors import VmmError
from pyvmm.status import STATUS_HELP, ExitStatus
from pyvmm.trace import EVENT_CLASSES
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
  pyvmm run --config vm.toml --memory 1G --trace virtio --trace-file trace.txt
  pyvmm run --kernel images/out/bzImage --initrd images/out/initrd.cpio.gz --exec "uname -r"
  pyvmm run --kernel images/out/vmlinux --initrd images/out/initrd.cpio.gz --gdb 1234 --gdb-wait
      then, in another terminal: gdb images/out/vmlinux.debug -ex "target remote :1234"
  pyvmm config --print --config vm.toml --memory 1G     (the effective configuration, as TOML)
"""


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of ``pyvmm run`` (and ``pyvmm config``).  The parser's argument default is SUPPRESS: a
    flag that is absent leaves the config file's value (or RunSettings' default, quoted in the help)."""
    d = RunSettings()
    p.add_argument("--config", metavar="FILE",
                   help="read options from a TOML config file (docs/config.md); flags given here override it")
    p.add_argument("--kernel", metavar="PATH",
                   help="ELF vmlinux or bzImage (the format is detected from the file); required, here or in "
                        "the config file")
    p.add_argument("--initrd", metavar="PATH", help="initramfs/initrd image")
    p.add_argument("--cmdline", metavar="TEXT",
                   help=f"kernel command line (default: {d.cmdline}); pyvmm appends reboot=k pci=off "
                        "8250.nr_uarts=1 i8042.nokbd unless given, plus the devices and any host workarounds")
    p.add_argument("--memory", "-m", metavar="SIZE",
                   help=f"guest RAM, e.g. 512M or 2G (default: {format_size(d.memory)})")
    p.add_argument("--cpus", type=int, metavar="N", help=f"number of vCPUs (default: {d.cpus})")
    p.add_argument("--disk", action="append", dest="disks", metavar="SPEC",
                   help="virtio-blk disk: path=IMG[,readonly=on][,serial=ID][,cache=writeback|none]"
                        "[,discard=on|off][,snapshot=on][,queues=N][,ring=auto|split|packed]; snapshot=on: the "
                        "guest may write, but its "
                        "writes go to a temporary overlay (in $TMPDIR, else /var/tmp) that is discarded at exit, "
                        "and IMG is only read; queues=N: request queues (default one per vCPU; above 1 the "
                        "device offers multiqueue and serves its queues at the same time); ring: the virtqueue "
                        "layout, auto (default: the packed one is offered and the guest chooses), split or "
                        "packed (required); repeat for vdb, vdc, ... (replaces the config file's disks)")
    p.add_argument("--console", metavar="WHERE",
                   help="guest console: stdio (default), none, or file:PATH")
    p.add_argument("--boot", choices=("elf", "guest"),
                   help="bzImage handling: elf = decompress on the host and boot the vmlinux inside (fast, "
                        "default); guest = run the kernel's own decompressor in the guest")
    p.add_argument("--workarounds", choices=("auto", "on", "off"),
                   help="host-KVM workarounds (emulation assist, kernel args): auto = only on a software-"
                        "emulating host KVM (default)")
    p.add_argument("--devices-via", choices=DEVICES_VIA,
                   help="how the guest finds the virtio-mmio disks: cmdline (virtio_mmio.device=), acpi (DSDT "
                        "LNRO0005 devices, for distro kernels), or both (default: the DSDT alone for a kernel "
                        "with ACPI; docs/acpi.md)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop the VM after this long (exit status 5)")
    p.add_argument("--panic-exit", action=argparse.BooleanOptionalAction,
                   help="stop with status 3 when the guest kernel panics (default); --no-panic-exit keeps "
                        "it running")
    p.add_argument("--trace", action="append", metavar="SEL",
                   help="trace virtio events, one line each: virtio (all), or comma-separated "
                        f"virtio.<class> with <class> in {', '.join(EVENT_CLASSES)}; none = off (default)")
    p.add_argument("--trace-file", metavar="PATH", help="write the trace here instead of stderr")
    p.add_argument("--stats", action="store_true",
                   help="at the end, print exits by kind and device register, the VMM time spent on each, the "
                        "time in KVM_RUN and from process start to the first KVM_RUN")
    p.add_argument("--exec", metavar="CMD",
                   help="run CMD in the guest and exit with its status: the default guests' /init runs "
                        "`sh -c CMD` (kernel argument pyvmm.exec=), reports the status through the guest exit "
                        "device and the VM ends; pyvmm exits 0 if CMD succeeded, else 32 + its status (see "
                        "exit status below; 7 if the guest ended without reporting one).  Needs guest user "
                        "space: a hardware KVM or the KVM lab")
    p.add_argument("--sandbox", type=_on_off, metavar="on|off",
                   help="on (default): before the guest runs, pyvmm confines itself with a seccomp filter "
                        "that refuses what a running VMM never needs (starting programs, fork, ptrace, mount, "
                        "module and kexec loading, bpf, new sockets...); a refused call fails with EPERM and "
                        "the exit reason says so.  off: no filter")
    p.add_argument("--virtio-mmio-version", type=int, metavar="1|2",
                   help="the virtio-mmio transport of the disks: 2 (default; virtio 1.x) or 1, the legacy "
                        "register file with page-based queues (virtio 1.2 section 4.2.4) that older guests and "
                        "kvmtool use")
    p.add_argument("--gdb", metavar="[HOST:]PORT",
                   help="serve the GDB remote protocol on PORT (loopback unless HOST is given; another host "
                        "is reachable by anyone who can reach this machine, and pyvmm warns): `gdb vmlinux` "
                        "then `target remote :PORT` stops the guest, and gdb can set breakpoints, single-step, "
                        "read registers and guest virtual memory; each vCPU is a thread.  See docs/gdb.md")
    p.add_argument("--gdb-wait", action="store_true",
                   help="with --gdb: the guest does not start until gdb attaches and continues it (break "
                        "on early kernel code)")
    p.add_argument("-v", "--verbose", action="count", help="more VMM messages on stderr (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="no VMM messages except errors")


def _on_off(text: str) -> bool:
    if text in ("on", "off"):
        return text == "on"
    raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse makes a formatter for every add_argument (to check the metavar), and each asks the terminal
    for its width, a system call: about fifty of them per start-up.  Ask once (as shutil.get_terminal_size
    does, without importing shutil and the compressors it imports)."""

    _columns: int | None = None

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            if _HelpFormatter._columns is None:
                _HelpFormatter._columns = _terminal_columns() - 2
            width = _HelpFormatter._columns
        super().__init__(prog, indent_increment, max_help_position, width)


def _terminal_columns() -> int:
    with contextlib.suppress(KeyError, ValueError):
        if int(os.environ["COLUMNS"]) > 0:
            return int(os.environ["COLUMNS"])
    out = sys.__stdout__
    try:
        return (os.get_terminal_size(out.fileno()).columns or 80) if out is not None else 80
    except (ValueError, OSError):  # closed, or not a terminal
        return 80


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; given the ``command`` the arguments name, only that subcommand is made, with its ~25
    options (argparse does real work for each parser and option, and a start-up needs one subcommand's).
    Without a command every subcommand is made with its options; with an unknown one (a typo) every
    subcommand is made, for the list of choices in the error."""
    p = argparse.ArgumentParser(prog="pyvmm", description="A small VMM in Python on Linux KVM.",
                                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command != "config":
        _add_run_parser(sub, command in (None, "run"))
    if command != "run":
        _add_config_parser(sub, command in (None, "config"))
    return p


def _add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_options: bool) -> None:
    r = sub.add_parser(
        "run",
        help="boot a Linux kernel",
        description="Boot an x86_64 Linux kernel (ELF vmlinux or bzImage) with an optional initrd and disks.",
        epilog=RUN_EPILOG,
        formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    if with_options:
        _add_run_options(r)


def _add_config_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_options: bool) -> None:
    c = sub.add_parser(
        "config",
        help="show the effective configuration of a run",
        description="Print, as a config file, the configuration `pyvmm run` would use with the same "
                    "options: defaults <- --config FILE <- flags.",
        formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    if with_options:
        c.add_argument("--print", action="store_true", help="print the effective configuration as TOML (default)")
        _add_run_options(c)


def _settings(args: argparse.Namespace) -> RunSettings:
    given = {k: v for k, v in vars(args).items() if k in FIELD_NAMES}
    return resolve(getattr(args, "config", None), given)


def main(argv: list[str] | None = None) -> int:
    args_given = sys.argv[1:] if argv is None else argv
    # The command is the first argument that is not an option (the top level has only -h and --version).
    parser = _parser(next((a for a in args_given if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    try:
        # The same checks for `run` and `config`: what `config --print` prints, `--config` accepts.
        settings = _settings(args)
        if args.command == "config":
            source = f" <- {args.config}" if getattr(args, "config", None) else ""
            text = settings.to_toml(header=f"pyvmm effective configuration: defaults{source} <- flags")
    except VmmError as err:
        print_err(f"error: {err}")
        return int(ExitStatus.BAD_INPUT)
    log.configure(log.WARNING if settings.verbose == 0 else log.INFO if settings.verbose == 1 else log.DEBUG)
    if args.command == "run":
        return _run(settings)
    if args.command == "config":
        sys.stdout.write(text)
        return 0
    parser.error(f"unknown command {args.command}")
    return int(ExitStatus.BAD_INPUT)


def _run(settings: RunSettings) -> int:
    from pyvmm.runner import run_vm  # imports KVM bits only when running

    # The guest must not reach anything the caller happened to leave open: close inherited fds.
    os.closerange(3, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 1024)
    try:
        return int(run_vm(settings.vm_config(), quiet=settings.quiet))
    except VmmError as err:
        print_err(f"error: {err}")
        return int(ExitStatus.BAD_INPUT)
    except KeyboardInterrupt:
        return int(ExitStatus.STOPPED)


if __name__ == "__main__":
    os._exit(main())
