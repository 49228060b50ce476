"""Run one host command inside the KVM lab and return its exit status.

The lab is ``qemu-system-x86_64 -M microvm,acpi=off -accel tcg -cpu EPYC,+svm,+npt`` running the lab
kernel (``images/out/lab-bzImage``, built by ``images/lab.py``): QEMU emulates an AMD CPU with SVM and
nested paging, so ``/dev/kvm`` inside behaves like a hardware KVM, while this host's own KVM may be a
software one that cannot run guest user space (docs: hosts.md).

Inside, the root file system is the host's ``/`` over 9p, read-only, so the command sees the same
interpreter, virtual environment and project tree at the same paths.  Writable: a scratch directory
(9p tag ``scratch``, mounted at its host path; test outputs, disk images), any extra ``rw`` directories
(tags ``rw0``, ``rw1``, ...), and tmpfs layers on ``/tmp``, ``/run``, ``/dev/shm``.

How a run goes: this module writes ``<scratch>/.pyvmm-lab/run.sh`` (working directory, environment,
command), starts QEMU with ``init=pyvmm/lab/init.sh`` (run by the host's ``/bin/sh``); init mounts what is needed, prints
``PYVMM-LAB: start``, runs ``run.sh`` on the console, writes its exit status to
``<scratch>/.pyvmm-lab/status`` and resets the machine (``reboot=t`` + QEMU ``-no-reboot``: microvm
without ACPI cannot power off).  In batch mode the console is streamed to stdout without the lab's own
boot messages; interactively QEMU's serial port is the terminal.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pyvmm.errors import VmmError
from pyvmm.lab.tsc import host_tsc_khz

QEMU = "qemu-system-x86_64"
QEMU_DEBIAN_PACKAGE = "qemu-system-x86"
# The project checkout this module runs from.  An installed pyvmm (a wheel) has no checkout: REPO is then
# its site-packages, without images/ (is_checkout() tells), and the lab kernel comes from $PYVMM_LAB_KERNEL
# or --kernel.
REPO = Path(__file__).resolve().parents[2]
LAB_KERNEL = REPO / "images" / "out" / "lab-bzImage"
LAB_KERNEL_ENV = "PYVMM_LAB_KERNEL"
# The aarch64 lab: qemu-system-aarch64's virt board with EL2 (virtualization=on), GICv3, -cpu max;
# Debian's stock arm64 kernel, an initramfs with its 9p modules, and an arm64 root with Python
# (images/arm64.py builds all three).
QEMU_AARCH64 = "qemu-system-aarch64"
QEMU_AARCH64_DEBIAN_PACKAGE = "qemu-system-arm"
AARCH64_LAB = REPO / "images" / "out" / "arm64" / "lab"
AARCH64_CPUS = 2
# pauth-impdef: TCG computes pointer authentication with an implementation-defined hash instead of the
# architected QARMA, which Debian's arm64 kernel and user space use on every call (measured by
# images/arm64.py: lab start 22 s -> 7 s, Python imports 14 s -> 7 s).  The guest cannot tell.
AARCH64_CPU_MODEL = "max,pauth-impdef=on"
# The lab's own GIC: 3 (default); PYVMM_LAB_AARCH64_GIC=2 gives a lab whose KVM offers only a vGICv2,
# which exercises pyvmm's fallback to it.
AARCH64_GIC_ENV = "PYVMM_LAB_AARCH64_GIC"
# What the aarch64 lab's commands run with: the arm64 root's own programs, pyvmm from the shared project tree.
AARCH64_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ARCHES = ("x86_64", "aarch64")
# Other names of an architecture (Debian's and the kernel's ARCH= for aarch64): accepted, never printed.
ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}
INIT_SCRIPT = Path(__file__).resolve().with_name("init.sh")
CONTROL_DIR = ".pyvmm-lab"

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MEMORY = "3G"
# The measured configuration (hosts.md, "The KVM lab"): one vCPU (two hung in AP bring-up).
CPU_MODEL = "EPYC,+svm,+npt"
NINEP_OPTS = "trans=virtio,version=9p2000.L,msize=262144,cache=loose"

# How often run()'s watchdog is asked whether the lab should be stopped.
WATCHDOG_POLL_S = 1.0
# run()'s watchdog: a reason to stop the lab now, or None to go on.
Watchdog = Callable[[], str | None]

# Exit statuses of a lab run that are not the command's own (like timeout(1) and env(1)).
STATUS_TIMEOUT = 124
STATUS_LAB_FAILED = 125
STATUS_NOT_FOUND = 127

START_MARK = b"PYVMM-LAB: "
# Paths go on the kernel command line and into 9p mount options: keep them plain.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9_./+@%-]*")
# Environment variables not carried into the lab: they describe this process or this terminal session.
_ENV_SKIP = frozenset({"PWD", "OLDPWD", "SHLVL", "_", "PS1", "PROMPT_COMMAND"})


class LabError(VmmError):
    """The lab cannot run here (QEMU or the lab kernel missing, a bad path); the message says what to do."""


@dataclass(frozen=True)
class LabOptions:
    command: Sequence[str]
    cwd: Path = field(default_factory=Path.cwd)
    scratch: Path | None = None  # None: a fresh temporary directory, removed afterwards
    keep_scratch: bool = False
    rw: Sequence[Path] = ()
    timeout: float | None = DEFAULT_TIMEOUT_S  # None or 0: no limit
    memory: str = DEFAULT_MEMORY
    interactive: bool = False
    kernel: Path | None = None
    env: Mapping[str, str] | None = None  # None: this process's environment (x86_64) or a minimal one (aarch64)
    verbose: bool = False
    arch: str = "x86_64"  # "aarch64" (or "arm64"): the emulated-EL2 lab; the command runs in its arm64 root


@dataclass
class LabResult:
    status: int
    boot_s: float | None  # QEMU start to the lab's init running the command
    total_s: float
    timed_out: bool = False
    boot_log: str = ""  # the lab's own console output before the command started
    reason: str = ""

    @property
    def command_s(self) -> float | None:
        return None if self.boot_s is None else self.total_s - self.boot_s


def lab_kernel(kernel: Path | None = None) -> Path:
    if kernel is not None:
        return kernel
    return Path(os.environ.get(LAB_KERNEL_ENV) or LAB_KERNEL)


def is_checkout() -> bool:
    """Whether pyvmm runs from a project checkout, which has the scripts that build the lab's images."""
    return (REPO / "images" / "lab.py").is_file()


def unavailable_reason(kernel: Path | None = None, arch: str = "x86_64") -> str | None:
    """Why the lab cannot start on this machine, or None when it can."""
    flavour = FLAVOURS.get(ARCH_ALIASES.get(arch, arch))
    if flavour is None:
        return f"no {arch} lab: the labs are {', '.join(ARCHES)}"
    return flavour.unavailable(kernel)


def _x86_64_unavailable(kernel: Path | None) -> str | None:
    if shutil.which(QEMU) is None:
        return (f"{QEMU} is not installed: the KVM lab needs Debian's {QEMU_DEBIAN_PACKAGE} "
                f"(apt-get install {QEMU_DEBIAN_PACKAGE}, or `make deps`)")
    if not os.access(INIT_SCRIPT, os.X_OK):
        return f"the lab init script {INIT_SCRIPT} is missing or not executable (chmod +x it)"
    k = lab_kernel(kernel)
    if not k.is_file():
        from_env = kernel is None and bool(os.environ.get(LAB_KERNEL_ENV))
        if is_checkout():
            how = "build it with `python3 images/lab.py` (or `make lab-images`)"
        else:
            how = (f"set ${LAB_KERNEL_ENV} to a lab kernel (or `pyvmm.lab run --kernel PATH`); a pyvmm checkout "
                   "builds one with `make lab-images` (images/out/lab-bzImage)")
        if kernel is None and not from_env and not is_checkout():
            # Not the default path: in an installed pyvmm it names a directory that never exists.
            return f"no lab kernel: this pyvmm is installed without a checkout's images/out/; {how}"
        source = f" (from ${LAB_KERNEL_ENV})" if from_env else ""
        return f"the lab kernel {k}{source} is missing: {how}"
    return None


def _aarch64_unavailable(kernel: Path | None) -> str | None:
    if shutil.which(QEMU_AARCH64) is None:
        return (f"{QEMU_AARCH64} is not installed: the aarch64 lab needs Debian's {QEMU_AARCH64_DEBIAN_PACKAGE} "
                "(`make deps`)")
    missing = [p for p in (AARCH64_LAB / "vmlinuz", AARCH64_LAB / "initrd.cpio.gz", AARCH64_LAB / "root" / "bin")
               if not p.exists()]
    if missing:
        return f"the aarch64 lab is not built ({missing[0]} is missing): run `python3 images/arm64.py lab`"
    return None


def in_lab() -> bool:
    return os.environ.get("PYVMM_IN_LAB") == "1"


def _plain(path: Path, what: str) -> str:
    text = str(path)
    if not _PLAIN_PATH.fullmatch(text) or "," in text:
        raise LabError(f"{what} {text!r}: the lab needs an absolute path of letters, digits and _./+@%-")
    return text


def _resolve_command(argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> list[str]:
    if not argv:
        raise LabError("no command given (usage: python -m pyvmm.lab run -- COMMAND [ARG...])")
    exe = argv[0]
    if "/" in exe:
        # Not resolve(): a venv's python is a symlink, and Python finds its venv from the path it was run as.
        found: str | None = os.path.normpath(cwd / exe)
    else:  # resolve on the host with the environment the command will get, so it is the same program
        found = shutil.which(exe, path=env.get("PATH", os.defpath))
    if found is None or not os.access(found, os.X_OK):
        raise LabError(f"{exe}: command not found (PATH={env.get('PATH', '')})")
    return [found, *argv[1:]]


def _run_script(argv: Sequence[str], cwd: Path, env: Mapping[str, str], tty_size: tuple[int, int] | None) -> str:
    lines = ["# written by pyvmm.lab: the command to run inside the lab"]
    if tty_size:
        lines.append(f"stty rows {tty_size[0]} cols {tty_size[1]} 2>/dev/null")
    for key in sorted(env):
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) and key not in _ENV_SKIP:
            lines.append(f"export {key}={shlex.quote(env[key])}")
    lines.append(f"cd {shlex.quote(str(cwd))} || exit {STATUS_LAB_FAILED}")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


def qemu_command(kernel: Path, scratch: Path, rw: Sequence[Path], *, memory: str, interactive: bool,
                 verbose: bool) -> list[str]:
    mounts = ",".join(f"rw{i}:{_plain(p, 'writable share')}" for i, p in enumerate(rw))
    append = [
        "console=ttyS0", "reboot=t", "panic=-1", "8250.nr_uarts=1", "random.trust_cpu=on",
        # Without it a loaded host makes the lab's TSC calibration fail, and its KVM never enters a guest
        # (pyvmm/lab/tsc.py).
        *([f"tsc_early_khz={khz}"] if (khz := host_tsc_khz()) else []),
        *([] if verbose else ["quiet"]),
        "root=host", "rootfstype=9p", f"rootflags={NINEP_OPTS}", "ro",
        # Unknown name=value parameters become init's environment.  (Not "init=/bin/sh -- script":
        # QEMU appends its virtio_mmio.device= parameters at the end, which would then go to init.)
        f"PYVMM_LAB_SCRATCH={_plain(scratch, 'scratch directory')}",
        *([f"PYVMM_LAB_MOUNTS={mounts}"] if mounts else []),
        f"init={_plain(INIT_SCRIPT, 'lab init script')}",
    ]
    cmd = [
        QEMU, "-M", "microvm,acpi=off", "-accel", "tcg", "-cpu", CPU_MODEL, "-smp", "1", "-m", memory,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(kernel), "-append", " ".join(append),
        "-fsdev", "local,id=host,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-device,fsdev=host,mount_tag=host",
    ]
    return cmd + _shares_and_console(scratch, rw, interactive)


def qemu_command_aarch64(kernel: Path | None, scratch: Path, rw: Sequence[Path], *, memory: str,
                         interactive: bool, verbose: bool) -> list[str]:
    """The aarch64 lab (``kernel`` is its own; None: images/out/arm64/lab/vmlinuz): EL2 + GICv3 so its
    kernel offers /dev/kvm; the root comes from the initramfs'
    overlay over the 9p share ``host`` (images/lab-arm64-init.sh), which then runs pyvmm/lab/init.sh."""
    mounts = ",".join(f"rw{i}:{_plain(p, 'writable share')}" for i, p in enumerate(rw))
    append = ["console=ttyAMA0", "panic=-1", "random.trust_cpu=on", *([] if verbose else ["quiet"]),
              f"PYVMM_LAB_SCRATCH={_plain(scratch, 'scratch directory')}",
              *([f"PYVMM_LAB_MOUNTS={mounts}"] if mounts else [])]
    cmd = [
        QEMU_AARCH64, "-M", f"virt,virtualization=on,gic-version={os.environ.get(AARCH64_GIC_ENV) or '3'}",
        "-accel", "tcg", "-cpu", AARCH64_CPU_MODEL,
        "-smp", str(AARCH64_CPUS), "-m", memory,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(kernel or AARCH64_LAB / "vmlinuz"), "-initrd", str(AARCH64_LAB / "initrd.cpio.gz"),
        "-append", " ".join(append),
        "-fsdev", f"local,id=host,path={AARCH64_LAB / 'root'},security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-device,fsdev=host,mount_tag=host",
    ]
    return cmd + _shares_and_console(scratch, rw, interactive)


def _shares_and_console(scratch: Path, rw: Sequence[Path], interactive: bool) -> list[str]:
    """QEMU arguments both labs share: the scratch and --rw 9p shares (virtio-mmio), the serial console."""
    args = ["-fsdev", f"local,id=scratch,path={scratch},security_model=none,multidevs=remap",
            "-device", "virtio-9p-device,fsdev=scratch,mount_tag=scratch"]
    for i, p in enumerate(rw):
        args += ["-fsdev", f"local,id=rw{i},path={p},security_model=none,multidevs=remap",
                 "-device", f"virtio-9p-device,fsdev=rw{i},mount_tag=rw{i}"]
    if interactive:
        # signal=off: Ctrl-C goes to the lab's console (and on to the command), not to QEMU.
        args += ["-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con"]
    else:
        args += ["-serial", "stdio"]
    return args


class ConsoleFilter:
    """Split the lab console into the lab's own messages and the command's output.

    Everything before ``PYVMM-LAB: start`` is the boot log (kept, shown only on failure or with -v);
    then the bytes go to ``out`` as they come, without CR of CRLF, until ``PYVMM-LAB: exit``.
    A possible marker prefix at the end of a chunk is held back until the next chunk decides.
    """

    def __init__(self, out: Callable[[bytes], None], *, verbose: bool = False) -> None:
        self.out = out
        self.verbose = verbose
        self.state = "boot"  # boot -> command -> done
        self.boot_log = bytearray()
        self.pending = b""
        self.start_uptime: float | None = None
        self.marks: list[tuple[float, bytes]] = []

    def feed(self, data: bytes) -> None:
        self.pending += data
        while self.state == "boot":
            nl = self.pending.find(b"\n")
            if nl < 0:
                return
            line, self.pending = self.pending[: nl + 1], self.pending[nl + 1 :]
            if line.startswith(START_MARK + b"start"):
                self.state = "command"
                self.marks.append((time.monotonic(), line.strip()))
            else:
                self.boot_log += line
                if self.verbose:
                    self.out(line.replace(b"\r\n", b"\n"))
        if self.state == "command":
            self._feed_command()
        if self.state == "done":
            self.boot_log += self.pending
            self.pending = b""

    def _feed_command(self) -> None:
        buf = self.pending.replace(b"\r\n", b"\n")
        while (idx := buf.find(START_MARK)) >= 0:
            nl = buf.find(b"\n", idx)
            self._emit(buf[:idx])
            if nl < 0:  # the marker line is not complete yet
                self.pending = buf[idx:]
                return
            mark, buf = buf[idx:nl].strip(), buf[nl + 1 :]
            self.marks.append((time.monotonic(), mark))
            if mark.startswith(START_MARK + b"exit"):
                self.state = "done"
                self.pending = buf
                return
        # Hold back what may be the start of a marker (or the CR of a CRLF) until the next chunk.
        keep = next((n for n in range(min(len(START_MARK), len(buf)), 0, -1) if START_MARK.startswith(buf[-n:])), 0)
        if keep == 0 and buf.endswith(b"\r"):
            keep = 1
        self._emit(buf[: len(buf) - keep])
        self.pending = buf[len(buf) - keep :]

    def _emit(self, data: bytes) -> None:
        if data:
            self.out(data)

    def finish(self) -> None:
        if self.state == "command" and self.pending:
            self._emit(self.pending.replace(b"\r\n", b"\n"))
        elif self.state != "command":
            self.boot_log += self.pending
        self.pending = b""


def _write_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(opts: LabOptions, out: Callable[[bytes], None] = _write_stdout, *,
        watchdog: Watchdog | None = None) -> LabResult:
    """Run ``opts.command`` inside the lab; raises :class:`LabError` when the lab cannot start.

    ``watchdog`` (batch mode only) is called at least every WATCHDOG_POLL_S seconds while the lab runs; when it
    returns a reason, QEMU is stopped and the run ends like a timeout (status STATUS_TIMEOUT, that reason).
    It lets a caller that follows the command's output give each part of the run its own bound, instead of
    waiting for ``opts.timeout``, the bound of the whole run.
    """
    reason = unavailable_reason(opts.kernel, opts.arch)
    if reason:
        raise LabError(reason)
    if watchdog is not None and opts.interactive:
        raise LabError("a watchdog needs batch mode: the console of an interactive lab is the terminal's")
    flavour = FLAVOURS[ARCH_ALIASES.get(opts.arch, opts.arch)]
    cwd = opts.cwd.resolve()
    rw = [p.resolve() for p in opts.rw]
    env, argv = flavour.prepare(opts, cwd, rw)
    for p in rw:
        if not p.is_dir():
            raise LabError(f"writable share {p} is not a directory")
    own_scratch = opts.scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="pyvmm-lab-")) if opts.scratch is None else opts.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    ctl = scratch / CONTROL_DIR
    shutil.rmtree(ctl, ignore_errors=True)
    ctl.mkdir()
    env.update(PYVMM_IN_LAB="1", PYVMM_LAB_SCRATCH=str(scratch))
    tty_size = None
    if opts.interactive and sys.stdin.isatty():
        size = shutil.get_terminal_size()
        tty_size = (size.lines, size.columns)
    elif not sys.stdout.isatty():
        env["TERM"] = "dumb"
    (ctl / "run.sh").write_text(_run_script(argv, cwd, env, tty_size))
    cmd = flavour.qemu_command(opts.kernel, scratch, rw, memory=opts.memory, interactive=opts.interactive,
                               verbose=opts.verbose)
    (ctl / "qemu.cmd").write_text(shlex.join(cmd) + "\n")
    try:
        return _run_qemu(cmd, ctl, opts, out, watchdog)
    finally:
        if own_scratch and not opts.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _run_qemu(cmd: list[str], ctl: Path, opts: LabOptions, out: Callable[[bytes], None],
              watchdog: Watchdog | None = None) -> LabResult:
    t0 = time.monotonic()
    deadline = t0 + opts.timeout if opts.timeout else None
    timed_out = False
    stopped_by: str | None = None  # the watchdog's reason
    filt = ConsoleFilter(out, verbose=opts.verbose)
    if opts.interactive:
        proc = subprocess.Popen(cmd)
        try:
            proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        except BaseException:  # Ctrl-C, or the caller's own timeout (e.g. pytest-timeout's SIGALRM)
            _stop(proc)
            raise
    else:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        try:
            while True:
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    timed_out = True
                    _stop(proc)
                    break
                if watchdog is not None:
                    stopped_by = watchdog()
                    if stopped_by:
                        timed_out = True
                        _stop(proc)
                        break
                    wait = WATCHDOG_POLL_S if wait is None else min(wait, WATCHDOG_POLL_S)
                ready, _, _ = select.select([fd], [], [], wait)
                if not ready:
                    continue
                data = os.read(fd, 65536)
                if not data:
                    break
                filt.feed(data)
        except BaseException:  # Ctrl-C, or the caller's own timeout: QEMU must not outlive the call
            _stop(proc)
            raise
        finally:
            filt.finish()
            proc.stdout.close()
        proc.wait()
    total = time.monotonic() - t0
    start = next((t for t, m in filt.marks if m.startswith(START_MARK + b"start")), None)
    boot_s = None if start is None else start - t0
    result = LabResult(STATUS_LAB_FAILED, boot_s, total, timed_out,
                       filt.boot_log.decode(errors="replace"))
    status_file = ctl / "status"
    if stopped_by:
        result.status = STATUS_TIMEOUT
        result.reason = f"{stopped_by}; QEMU was stopped after {total:.0f} s"
    elif timed_out:
        result.status = STATUS_TIMEOUT
        result.reason = f"timed out after {opts.timeout:g} s; QEMU was stopped"
    elif status_file.is_file() and status_file.read_text().strip().isdigit():
        result.status = int(status_file.read_text().strip())
    elif proc.returncode != 0:
        result.reason = f"QEMU exited with status {proc.returncode}"
    else:
        result.reason = "the lab ended without reporting the command's exit status (see its console above)"
    return result


def _x86_64_prepare(opts: LabOptions, cwd: Path, rw: list[Path]) -> tuple[dict[str, str], list[str]]:
    """The host's environment and the command as the host resolves it: the lab's root is the host's."""
    env = dict(os.environ if opts.env is None else opts.env)
    return env, _resolve_command(opts.command, env, cwd)


def _aarch64_prepare(opts: LabOptions, cwd: Path, rw: list[Path]) -> tuple[dict[str, str], list[str]]:
    """The host's environment names x86 programs (a venv's python first on PATH): the arm64 root gets its
    own PATH, pyvmm from the project tree (shared writable at its host path, added to ``rw``), and
    ``opts.env``; the command is resolved inside that root, not here."""
    if not opts.command:
        raise LabError("no command given (usage: python -m pyvmm.lab run --arch aarch64 -- COMMAND [ARG...])")
    env = {"PATH": AARCH64_PATH, "HOME": "/root", "LANG": "C.UTF-8", "PYTHONPATH": str(REPO),
           "PYTHONDONTWRITEBYTECODE": "1", **(opts.env or {})}
    if REPO not in rw:
        rw.append(REPO)
    return env, list(opts.command)


def _x86_64_qemu(kernel: Path | None, scratch: Path, rw: Sequence[Path], *, memory: str, interactive: bool,
                 verbose: bool) -> list[str]:
    return qemu_command(lab_kernel(kernel), scratch, rw, memory=memory, interactive=interactive, verbose=verbose)


class LabFlavour(NamedTuple):
    """What one architecture's lab does its own way; :func:`run` is the same for all of them."""

    unavailable: Callable[[Path | None], str | None]  # why it cannot start here (kernel: --kernel), or None
    # the command's environment and argv (may add shares to rw)
    prepare: Callable[[LabOptions, Path, list[Path]], tuple[dict[str, str], list[str]]]
    qemu_command: Callable[..., list[str]]  # (kernel, scratch, rw, *, memory, interactive, verbose) -> argv


FLAVOURS = {
    "x86_64": LabFlavour(_x86_64_unavailable, _x86_64_prepare, _x86_64_qemu),
    "aarch64": LabFlavour(_aarch64_unavailable, _aarch64_prepare, qemu_command_aarch64),
}
assert tuple(FLAVOURS) == ARCHES
