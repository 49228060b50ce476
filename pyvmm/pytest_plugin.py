"""pytest plugin for boot tests with :class:`pyvmm.VM` (registered as the ``pyvmm`` pytest11 entry point).

Fixtures:

``vm_factory``
    ``vm_factory(**kwargs) -> VM``: a started VM with the session's kernel, initrd, memory and timeout
    unless given (``initrd=None`` drops the initrd); ``start=False`` returns it unstarted.  Every VM is
    stopped and cleaned up after the test.
``booted_vm``
    The default guest booted to a shell on its console (``init=/bin/sh`` on the ``--pyvmm-disk`` root,
    or ``rdinit=/bin/sh`` on the initrd), ready for ``booted_vm.run("uname -r")``.  It needs guest user
    space: on a software-emulating host KVM (hosts.md) it skips; run it in the KVM lab or on hardware.
``booted_vm_session``
    The same guest, booted once per session (once per pytest-xdist worker) and shared by every test that
    uses it: for suites that only look at one guest.  Tests must leave its state alone (no reboot, no
    changed files or settings another test could see).
``pyvmm_images``
    The session's :class:`PyvmmImages` (what the settings below resolved to).

Settings, each a command-line option, an environment variable and an ini option (pytest.ini, or
``[tool.pytest.ini_options]`` in pyproject.toml); the first of these given wins:

=================== ================== ============== ==============================================
option              environment        ini            what
=================== ================== ============== ==============================================
``--pyvmm-kernel``  ``PYVMM_KERNEL``   pyvmm_kernel   kernel (default: ``images/out/vmlinux``)
``--pyvmm-initrd``  ``PYVMM_INITRD``   pyvmm_initrd   initrd (default: ``images/out/initrd.cpio.gz``)
``--pyvmm-disk``    ``PYVMM_DISK``     pyvmm_disk     root disk image, tests get a copy (default:
                                                      ``images/out/rootfs.ext4``)
``--pyvmm-memory``  ``PYVMM_MEMORY``   pyvmm_memory   guest RAM (default 256M)
``--pyvmm-timeout`` ``PYVMM_TIMEOUT``  pyvmm_timeout  ``pyvmm run --timeout`` of each VM (default 600)
``--pyvmm-require`` ``PYVMM_REQUIRE``  pyvmm_require  a missing image or KVM fails the test, not skips it
``--pyvmm-log-dir`` ``PYVMM_LOG_DIR``  pyvmm_log_dir  keep each VM's console and pyvmm log there
=================== ================== ============== ==============================================

A relative path is relative to the working directory (option, environment) or to the ini file's
directory (ini).  The image defaults are under pytest's root directory, used when they are there; an
image given explicitly must exist, or the run stops with a usage error.  Path options must be written
``--pyvmm-kernel=PATH``: pytest chooses its root directory before it loads plugins, so in
``--pyvmm-kernel PATH`` it takes PATH for a test path, and the plugin refuses that run.

When a test that used a VM fails, its report gets a section per VM with pyvmm's log and the console tail.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import re
import shlex
import shutil
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import pytest

from pyvmm.api import VM
from pyvmm.config import parse_memory
from pyvmm.errors import ConfigError

DEFAULT_MEMORY = "256M"
DEFAULT_TIMEOUT_S = 600.0  # a bound, not a benchmark: a boot takes ~1-2 min on a software KVM, <1 s on hardware
SHELL_TIMEOUT_S = 300.0
TAIL_LINES = 40
NO_KERNEL = "no kernel: pass --pyvmm-kernel or build the default guest (make images)"
SESSION_FIXTURE = "booted_vm_session"
_VMS = pytest.StashKey[list[VM]]()  # a test's VMs, for its failure report
_SESSION_VMS = pytest.StashKey[list[VM]]()  # the session VM, for the failure report of a test that uses it
_IMAGES = pytest.StashKey["PyvmmImages"]()


@dataclass(frozen=True)
class PyvmmImages:
    """The guest under test and how the plugin treats it, from its settings or ``images/out/``."""

    kernel: Path | None
    initrd: Path | None
    disk: Path | None
    memory: str
    timeout: float
    require: bool = False  # a missing image or KVM fails the test instead of skipping it
    log_dir: Path | None = None  # where each VM's console and pyvmm log are kept


@dataclass(frozen=True)
class _Setting:
    """One setting: ``--pyvmm-NAME``, ``$PYVMM_NAME``, ini ``pyvmm_NAME``.  No metavar: a flag."""

    name: str
    metavar: str | None
    help: str

    @property
    def option(self) -> str:
        return "--pyvmm-" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "PYVMM_" + self.name.upper()

    @property
    def ini(self) -> str:
        return "pyvmm_" + self.name


_SETTINGS = {s.name: s for s in (
    _Setting("kernel", "PATH", "kernel under test (default: images/out/vmlinux)"),
    _Setting("initrd", "PATH", "initrd (default: images/out/initrd.cpio.gz)"),
    _Setting("disk", "PATH", "root disk image; each test boots a copy (default: images/out/rootfs.ext4)"),
    _Setting("memory", "SIZE", f"guest RAM (default: {DEFAULT_MEMORY})"),
    _Setting("timeout", "SECONDS", f"pyvmm run --timeout for each VM (default: {DEFAULT_TIMEOUT_S:.0f})"),
    _Setting("require", None, "a missing image or KVM fails the test instead of skipping it"),
    _Setting("log_dir", "DIR", "keep each VM's console and pyvmm log in DIR, named after the test"),
)}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyvmm", "pyvmm boot tests")
    for s in _SETTINGS.values():
        also = f"also ${s.env} or ini {s.ini}"
        if s.metavar is None:
            # default None: "not given", so that the environment and the ini file can decide
            group.addoption(s.option, action="store_true", default=None, dest=s.ini, help=f"{s.help} ({also})")
        else:
            # write it with '=' (--pyvmm-kernel=PATH): see _refuse_space_form
            group.addoption(s.option, metavar=s.metavar, dest=s.ini, help=f"{s.help} ({also})")
        parser.addini(s.ini, f"{s.help} ({s.option}, ${s.env})", type="string", default="")


class _Given(NamedTuple):
    """A setting's value as given, where it came from, and what a relative path in it is relative to."""

    value: str
    source: str
    base: Path


def _given(config: pytest.Config, s: _Setting) -> _Given | None:
    """The setting from the command line, else the environment, else the ini file; None if not given."""
    cwd = config.invocation_params.dir
    value = config.getoption(s.ini)
    if value is not None:
        return _Given("1" if value is True else str(value), s.option, cwd)
    value = os.environ.get(s.env, "")
    if value:
        return _Given(value, s.env, cwd)
    value = str(config.getini(s.ini))
    if value:
        if config.inipath is None:  # only -o/--override-ini gives an ini value without an ini file
            return _Given(value, f"ini {s.ini}", cwd)
        return _Given(value, f"{s.ini} in {config.inipath}", config.inipath.parent)
    return None


def _image(config: pytest.Config, name: str, what: str, default: str) -> Path | None:
    given = _given(config, _SETTINGS[name])
    if given is None:
        path = config.rootpath / "images" / "out" / default
        return path if path.is_file() else None
    # Given explicitly, it must be there: a typo must stop the run, not turn it into a row of skips.
    path = given.base / Path(given.value).expanduser()
    if not path.exists():
        raise pytest.UsageError(f"pyvmm: {what} {path} ({given.source}): no such file")
    if path.is_dir():
        raise pytest.UsageError(f"pyvmm: {what} {path} ({given.source}) is a directory")
    return path


def _resolve(config: pytest.Config) -> PyvmmImages:
    """The session's settings, checked: a bad one is a usage error (one line naming it and its source)."""
    memory = _given(config, _SETTINGS["memory"])
    if memory is not None:
        try:
            parse_memory(memory.value)
        except ConfigError as err:
            raise pytest.UsageError(f"pyvmm: bad memory {memory.value!r} ({memory.source}): {err}") from None
    timeout = _given(config, _SETTINGS["timeout"])
    timeout_s = DEFAULT_TIMEOUT_S
    if timeout is not None:
        try:
            timeout_s = float(timeout.value)
        except ValueError:
            timeout_s = float("nan")
        if not 0 < timeout_s < float("inf"):
            raise pytest.UsageError(f"pyvmm: bad timeout {timeout.value!r} ({timeout.source}): "
                                    "expected a positive number of seconds")
    require = _given(config, _SETTINGS["require"])
    if require is not None and require.value.lower() not in _TRUE + _FALSE:
        raise pytest.UsageError(f"pyvmm: bad require {require.value!r} ({require.source}): "
                                "expected 1/0, true/false, yes/no or on/off")
    log_dir = _given(config, _SETTINGS["log_dir"])
    log_path = None
    if log_dir is not None:
        log_path = log_dir.base / Path(log_dir.value).expanduser()
        try:
            log_path.mkdir(parents=True, exist_ok=True)  # several xdist workers may race here: harmless
        except OSError as err:
            raise pytest.UsageError(f"pyvmm: log directory {log_path} ({log_dir.source}): {err.strerror}") from None
    return PyvmmImages(
        kernel=_image(config, "kernel", "kernel", "vmlinux"),
        initrd=_image(config, "initrd", "initrd", "initrd.cpio.gz"),
        disk=_image(config, "disk", "disk image", "rootfs.ext4"),
        memory=DEFAULT_MEMORY if memory is None else memory.value,
        timeout=timeout_s,
        require=require is not None and require.value.lower() in _TRUE,
        log_dir=log_path,
    )


def _refuse_space_form(config: pytest.Config) -> None:
    """Refuse ``--pyvmm-kernel PATH``: pytest chose its rootdir with PATH taken for a test path.

    pytest determines its rootdir and ini file from the command line (and ``PYTEST_ADDOPTS``) before it
    loads plugins, so it does not know yet that these options take a value, and every argument that names
    an existing file or directory counts as a test path.  ``--pyvmm-kernel /etc/passwd`` run in a project
    makes ``/etc`` the rootdir and ignores the project's ini file.  A plugin cannot change that decision
    afterwards, so the run stops with the fix: the ``--pyvmm-kernel=PATH`` form, which pytest takes for an
    option, whatever it knows.  The ini file's ``addopts`` are read after the rootdir and are harmless.
    """
    with_value = {s.option for s in _SETTINGS.values() if s.metavar is not None}
    args = [*shlex.split(os.environ.get("PYTEST_ADDOPTS", "")), *map(str, config.invocation_params.args)]
    for option, value in itertools.pairwise(args):
        if option == "--":  # the rest are test paths
            return
        if option not in with_value or value.startswith("-"):
            continue
        path = config.invocation_params.dir / value.split("::")[0]  # as pytest reads a test path
        try:
            taken = path.exists()
        except (OSError, ValueError):
            taken = False
        if taken:
            raise pytest.UsageError(
                f"pyvmm: write {option}={value} (with '='): pytest chooses its rootdir before it loads "
                f"plugins, and took {value} for a test path (rootdir: {config.rootpath})")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("help") or config.getoption("version"):
        return
    _refuse_space_form(config)
    config.stash[_IMAGES] = _resolve(config)


@pytest.fixture(scope="session")
def pyvmm_images(pytestconfig: pytest.Config) -> PyvmmImages:
    return pytestconfig.stash[_IMAGES]


def _unavailable(images: PyvmmImages, reason: str) -> NoReturn:
    """Skip for something missing on this machine (an image, KVM); fail instead under require."""
    if images.require:
        pytest.fail(f"{reason} (pyvmm require is on: a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def _kvm_missing() -> str | None:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return f"/dev/kvm cannot be opened: {err.strerror}"
    os.close(fd)
    return None


def _file_name(text: str) -> str:
    """``text`` (a node id) as a file name: runs of other characters than ``[A-Za-z0-9_.-]`` become
    ``_``; a long one is cut and made unique by a hash."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "_"
    if len(name) > 150:
        name = f"{name[:120]}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    return name


VmFactory = Callable[..., VM]


class _VmMaker:
    """``make(*, start=True, **VM_kwargs) -> VM`` with the session's images as defaults.  :meth:`close`
    stops every VM it made and, with a log directory, keeps their consoles and logs as
    ``<stem>.<vm name>.console.log`` and ``<stem>.<vm name>.pyvmm.log``."""

    def __init__(self, images: PyvmmImages, stem: str, shown: list[VM]) -> None:
        self.images = images
        self.stem = stem
        self.shown = shown  # the list a failure report reads (the test's VMs, or the session's)
        self.made: list[VM] = []

    def __call__(self, *, start: bool = True, **kwargs: Any) -> VM:
        if "kernel" not in kwargs:
            if self.images.kernel is None:
                _unavailable(self.images, NO_KERNEL)
            kwargs["kernel"] = self.images.kernel
        if "initrd" not in kwargs:
            kwargs["initrd"] = self.images.initrd
        kwargs.setdefault("memory", self.images.memory)
        kwargs.setdefault("timeout", self.images.timeout)
        kwargs.setdefault("name", f"vm{len(self.shown)}")
        vm = VM(**kwargs)
        self.shown.append(vm)
        self.made.append(vm)
        return vm.start() if start else vm

    def close(self) -> None:
        for vm in self.made:
            try:
                vm.close()  # the console transcript and the log stay readable after close
            finally:
                if self.images.log_dir is not None and vm.started_at is not None:
                    base = self.images.log_dir / f"{self.stem}.{_file_name(vm.name)}"
                    Path(f"{base}.console.log").write_text(vm.console_text, errors="replace")
                    Path(f"{base}.pyvmm.log").write_text(vm.log, errors="replace")


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest, pyvmm_images: PyvmmImages) -> Iterator[VmFactory]:
    """``vm_factory(*, start=True, **VM_kwargs) -> VM``, with the session's images as defaults."""
    reason = _kvm_missing()
    if reason:
        _unavailable(pyvmm_images, reason)
    make = _VmMaker(pyvmm_images, _file_name(request.node.nodeid), request.node.stash.setdefault(_VMS, []))
    yield make
    make.close()


def _boot_to_shell(make: VmFactory, images: PyvmmImages, workdir: Path) -> VM:
    """The default guest with a shell on its console: a copy of the root disk, else the initrd."""
    from pyvmm.arch.x86_64 import hostkvm

    host = hostkvm.detect()
    if host.software and os.environ.get("PYVMM_IN_LAB") != "1":
        _unavailable(images, f"{host.reason}: guest user space cannot run here (docs: hosts.md); "
                             "use the KVM lab (pyvmm.lab) or a hardware KVM")
    if images.disk is not None:
        root = workdir / "root.img"
        shutil.copyfile(images.disk, root)
        vm = make(initrd=None, disks=[str(root)], cmdline="console=ttyS0 root=/dev/vda rw init=/bin/sh")
    elif images.initrd is not None:
        vm = make(cmdline="console=ttyS0 rdinit=/bin/sh")
    else:
        _unavailable(images, "a booted VM needs a root disk (--pyvmm-disk) or an initrd (--pyvmm-initrd)")
    vm.console.wait_for_shell(timeout=SHELL_TIMEOUT_S)
    return vm


@pytest.fixture
def booted_vm(vm_factory: VmFactory, pyvmm_images: PyvmmImages, tmp_path: Path) -> VM:
    """The default guest with a shell on its console (needs a KVM that runs guest user space)."""
    return _boot_to_shell(vm_factory, pyvmm_images, tmp_path)


@pytest.fixture(scope="session")
def booted_vm_session(request: pytest.FixtureRequest, pyvmm_images: PyvmmImages,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    """One ``booted_vm`` for the whole session (for each pytest-xdist worker): tests must not change its
    state."""
    reason = _kvm_missing()
    if reason:
        _unavailable(pyvmm_images, reason)
    # Under pytest-xdist each worker process has its own session, so its own guest and log files.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    stem = SESSION_FIXTURE + (f"-{_file_name(worker)}" if worker else "")
    make = _VmMaker(pyvmm_images, stem, request.config.stash.setdefault(_SESSION_VMS, []))
    try:
        yield _boot_to_shell(functools.partial(make, name="session"), pyvmm_images,
                             tmp_path_factory.mktemp(SESSION_FIXTURE))
    finally:
        make.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed:
        return
    test_vms: list[VM] = item.stash.get(_VMS, [])
    vms = list(test_vms)
    if SESSION_FIXTURE in getattr(item, "fixturenames", ()):  # only a test function has fixtures
        session_vms: list[VM] = item.config.stash.get(_SESSION_VMS, [])
        vms += session_vms
    for vm in vms:
        report.sections.append((f"pyvmm {vm.name}", vm.explain(TAIL_LINES)))
