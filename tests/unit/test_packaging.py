"""The wheel has everything the CLI and the KVM lab need: build it, install it into a fresh virtual
environment and run ``pyvmm --help`` and ``python -m pyvmm.lab check`` from outside the checkout.

The wheel is built without build isolation and without an index (the build backend, setuptools, is in
the dev extras), from a copy of the sources, so that the checkout's own build/ and egg-info stay out of
it.  The fresh environment has no pip and reaches pyvmm's runtime dependencies through a .pth file naming
this environment's site-packages; pyvmm itself comes only from the wheel.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAB_KERNEL = ROOT / "images" / "out" / "lab-bzImage"
# The first setuptools that reads PEP 639's license and license-files and builds wheels on its own.
SETUPTOOLS_MIN = (77, 0)
# What the build copies: the package and every file pyproject.toml names.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "pyvmm")
RUN_TIMEOUT_S = 60


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    site: Path  # the fresh environment's site-packages, where the wheel went
    outside: Path  # a working directory outside the checkout

    def run(self, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items()
                 if k not in ("PYTHONPATH", "PYTHONHOME", "PYVMM_LAB_KERNEL", "PYVMM_IN_LAB")}
        return subprocess.run(argv, cwd=self.outside, env={**clean, **env}, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S, check=False)


def _backend_missing() -> str | None:
    try:
        version = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        return "setuptools (the build backend) is not installed here: pip install -e '.[dev]'"
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < SETUPTOOLS_MIN:
        return (f"setuptools {version} is too old to build the wheel without fetching a newer one "
                f"(>= {'.'.join(map(str, SETUPTOOLS_MIN))}): pip install -e '.[dev]'")
    return None


def _site_packages(venv: Path) -> Path:
    found = list((venv / "lib").glob("python*/site-packages"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    reason = _backend_missing()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("pyvmm-*.whl")

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=RUN_TIMEOUT_S)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
         "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert install.returncode == 0, install.stdout + install.stderr
    site = _site_packages(venv)
    # The runtime dependencies from this environment.  A path line in a .pth file does not run that
    # directory's own .pth files, so this environment's editable pyvmm stays out.
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "runtime-deps.pth").write_text("".join(f"{p}\n" for p in deps))
    outside = tmp / "elsewhere"
    outside.mkdir()
    return Installed(wheel, venv, site, outside)


def test_wheel_carries_the_lab_init_the_type_marker_and_the_license(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
        assert "pyvmm/py.typed" in names
        assert "pyvmm/lab/init.sh" in names
        # The lab kernel executes init.sh itself (init=<path>): the wheel must keep its executable bit.
        mode = whl.getinfo("pyvmm/lab/init.sh").external_attr >> 16
        assert mode & stat.S_IXUSR, oct(mode)
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        text = whl.read(meta).decode()
        assert "License-Expression: MIT" in text


def test_installed_package_comes_from_the_wheel(installed: Installed) -> None:
    init = installed.site / "pyvmm" / "lab" / "init.sh"
    assert init.is_file() and os.access(init, os.X_OK)
    assert (installed.site / "pyvmm" / "py.typed").is_file()
    where = installed.run(str(installed.venv / "bin" / "python"), "-c", "import pyvmm; print(pyvmm.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.site)


def test_cli_help_runs_outside_the_checkout(installed: Installed) -> None:
    for argv in ([str(installed.venv / "bin" / "pyvmm"), "--help"],
                 [str(installed.venv / "bin" / "python"), "-m", "pyvmm", "run", "--help"]):
        proc = installed.run(*argv)
        assert proc.returncode == 0, proc.stderr
        assert "usage: pyvmm" in proc.stdout


def test_lab_check_without_a_lab_kernel_says_what_is_missing(installed: Installed) -> None:
    proc = installed.run(str(installed.venv / "bin" / "python"), "-m", "pyvmm.lab", "check")
    assert "Traceback" not in proc.stderr, proc.stderr
    # Outside a checkout there is no images/out: the lab cannot start, and one line says why.
    assert proc.returncode == 1, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if "the lab cannot start" in ln]
    if shutil.which("qemu-system-x86_64"):
        assert "PYVMM_LAB_KERNEL" in line and "make lab-images" in line, line
    else:
        assert "qemu-system-x86" in line, line
    assert "site-packages" not in line, line  # no made-up images/out path inside the installation


def test_lab_check_with_pyvmm_lab_kernel(installed: Installed, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-bzImage"
    proc = installed.run(str(installed.venv / "bin" / "python"), "-m", "pyvmm.lab", "check",
                         PYVMM_LAB_KERNEL=str(missing))
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian's qemu-system-x86): the lab cannot start here")
    assert f"{missing} (from $PYVMM_LAB_KERNEL) is missing" in proc.stderr, proc.stderr
    if not LAB_KERNEL.is_file():
        pytest.skip(f"{LAB_KERNEL} is not built (make lab-images)")
    proc = installed.run(str(installed.venv / "bin" / "python"), "-m", "pyvmm.lab", "check",
                         PYVMM_LAB_KERNEL=str(LAB_KERNEL))
    assert proc.returncode == 0, proc.stderr
    assert f"the lab can start (qemu-system-x86_64, kernel {LAB_KERNEL})" in proc.stderr, proc.stderr
