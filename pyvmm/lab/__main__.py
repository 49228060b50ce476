"""``python -m pyvmm.lab``: run a command in the KVM lab, check the lab, or boot a guest where it can run.

  python -m pyvmm.lab run [OPTIONS] -- COMMAND [ARG...]   run one command inside the lab
  python -m pyvmm.lab check                               can the lab start here? (exit 0 = yes)
  python -m pyvmm.lab guest [PYVMM RUN ARGS...]           `pyvmm run` on this host's KVM if it can run
                                                          guest user space, otherwise inside the lab
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pyvmm.lab import qemu
from pyvmm.lab.qemu import STATUS_LAB_FAILED, LabError, LabOptions, LabResult

EPILOG = f"""\
exit status: the command's own, or
  {qemu.STATUS_TIMEOUT}  the hard timeout (--timeout) expired; QEMU was stopped
  {qemu.STATUS_LAB_FAILED}  the lab could not start or did not report a status (QEMU or the lab kernel
       missing, kernel panic, ...); the reason and the lab's console are printed on stderr
  {qemu.STATUS_NOT_FOUND}  the command was not found on this host

inside the lab: the host's / read-only (9p), the scratch directory and every --rw directory writable at
their host paths, tmpfs (over the host's /tmp) on /tmp; PYVMM_IN_LAB=1 and PYVMM_LAB_SCRATCH are set.

examples:
  python -m pyvmm.lab run -- python -c 'import os; print(os.path.exists("/dev/kvm"))'
  python -m pyvmm.lab run --scratch out/ -- python -m pytest -m lab tests/lab
"""


def _log(msg: str) -> None:
    print(f"pyvmm.lab: {msg}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyvmm.lab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="run one command inside the KVM lab", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--timeout", type=float, default=qemu.DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="hard limit for the whole lab run, 0 = none (default: %(default)g)")
    r.add_argument("--scratch", type=Path, metavar="DIR",
                   help="writable scratch directory shared with the lab (default: a temporary one, removed "
                        "afterwards); $PYVMM_LAB_SCRATCH inside")
    r.add_argument("--keep-scratch", action="store_true", help="do not remove the temporary scratch directory")
    r.add_argument("--rw", type=Path, action="append", default=[], metavar="DIR",
                   help="also share DIR writable (at its host path); repeatable")
    r.add_argument("--memory", "-m", default=qemu.DEFAULT_MEMORY, metavar="SIZE",
                   help="lab RAM, QEMU syntax (default: %(default)s)")
    r.add_argument("--interactive", "-i", action="store_true",
                   help="attach the terminal to the lab console (QEMU's serial port) instead of streaming")
    r.add_argument("--kernel", type=Path, metavar="PATH",
                   help=f"lab kernel (default: $PYVMM_LAB_KERNEL or {qemu.LAB_KERNEL})")
    r.add_argument("--arch", choices=qemu.ARCHES, default="x86_64", type=lambda a: qemu.ARCH_ALIASES.get(a, a),
                   help="aarch64 (or arm64): the emulated-EL2 aarch64 lab (images/arm64.py); the command runs "
                        "in its arm64 root with the project tree shared (default: %(default)s)")
    r.add_argument("-v", "--verbose", action="store_true", help="show the lab's own boot messages too")
    r.add_argument("-q", "--quiet", action="store_true", help="no summary line at the end")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    sub.add_parser("check", help="say whether the lab can start on this machine")
    g = sub.add_parser("guest", help="boot a guest with `pyvmm run`, inside the lab where this host's KVM "
                                     "cannot run guest user space")
    g.add_argument("args", nargs=argparse.REMAINDER, help="[--] pyvmm run arguments")
    return p


def _report(result: LabResult, quiet: bool) -> None:
    if result.reason:
        tail = result.boot_log.replace("\r\n", "\n").splitlines()[-40:]
        if tail:
            _log("the lab's console (last lines):\n" + "\n".join(f"  | {line}" for line in tail))
        _log(f"error: {result.reason}")
    if not quiet or result.reason:
        boot = f"lab boot {result.boot_s:.1f} s, command {result.command_s:.1f} s, " if result.boot_s is not None else ""
        _log(f"exit status {result.status} ({boot}total {result.total_s:.1f} s)")


def _run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    opts = LabOptions(command=command, scratch=args.scratch, keep_scratch=args.keep_scratch, rw=args.rw,
                      timeout=args.timeout or None, memory=args.memory, interactive=args.interactive,
                      kernel=args.kernel, verbose=args.verbose, arch=args.arch)
    try:
        result = qemu.run(opts)
    except LabError as err:
        _log(f"error: {err}")
        return qemu.STATUS_NOT_FOUND if "command not found" in str(err) else STATUS_LAB_FAILED
    _report(result, args.quiet)
    return result.status


def _check() -> int:
    from pyvmm.arch.x86_64 import hostkvm

    host = hostkvm.detect()
    reason = qemu.unavailable_reason()
    _log(f"host: {host.reason}; {'inside the lab' if qemu.in_lab() else 'not inside the lab'}")
    if reason:
        _log(f"the lab cannot start: {reason}")
        return 1
    _log(f"the lab can start ({qemu.QEMU}, kernel {qemu.lab_kernel()})")
    return 0


def _writable_disk_dirs(pyvmm_args: Sequence[str]) -> list[Path]:
    """Directories of the writable ``--disk`` images: the lab must share them writable."""
    specs = [b for a, b in itertools.pairwise(pyvmm_args) if a == "--disk"]
    specs += [a.split("=", 1)[1] for a in pyvmm_args if a.startswith("--disk=")]
    dirs: list[Path] = []
    for spec in specs:
        fields = dict(kv.split("=", 1) for kv in spec.split(",") if "=" in kv)
        on = ("on", "yes", "true", "1")
        # A snapshot disk only reads its image (its writes go to an overlay in $TMPDIR): no share needed.
        if "path" in fields and fields.get("readonly", "off") not in on and fields.get("snapshot", "off") not in on:
            d = Path(fields["path"]).resolve().parent
            if d not in dirs:
                dirs.append(d)
    return dirs


def _guest(args: argparse.Namespace) -> int:
    from pyvmm.arch.x86_64 import hostkvm

    pyvmm_args = args.args[1:] if args.args[:1] == ["--"] else list(args.args)
    direct = [sys.executable, "-m", "pyvmm", "run", *pyvmm_args]
    host = hostkvm.detect()
    if qemu.in_lab() or not host.software:
        os.execv(sys.executable, direct)
    _log(f"{host.reason}: guest kernels boot here, but guest user space cannot run on it "
         "(see the README, \"KVM lab\").")
    reason = qemu.unavailable_reason()
    if reason:
        _log(f"the KVM lab cannot start either: {reason}")
        _log("booting on this host's KVM anyway: expect the kernel to stop at `Run /init` (exit status 3)")
        os.execv(sys.executable, direct)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    _log("so pyvmm runs the guest inside the KVM lab (QEMU TCG with an emulated SVM CPU: a nested KVM that "
         "behaves like hardware); the lab takes a few seconds to start"
         + ("; Ctrl-A x stops the guest" if interactive else ""))
    opts = LabOptions(command=direct, rw=_writable_disk_dirs(pyvmm_args), timeout=None, interactive=interactive)
    try:
        result = qemu.run(opts)
    except LabError as err:
        _log(f"error: {err}")
        return STATUS_LAB_FAILED
    _report(result, quiet=False)
    return result.status


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "run":
        return _run(args)
    if args.cmd == "check":
        return _check()
    return _guest(args)


if __name__ == "__main__":
    sys.exit(main())
