"""scripts/deps.sh picks the Debian packages of the asked-for job from scripts/apt-deps.txt; with
``--print`` it lists them and installs nothing, which is what these tests run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPS = ROOT / "scripts" / "deps.sh"
APT_DEPS = ROOT / "scripts" / "apt-deps.txt"
ARM64_ONLY = {"gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross", "qemu-system-arm", "device-tree-compiler",
              "debian-archive-keyring"}
KERNEL_BUILD = {"linux-source-6.1", "build-essential", "flex", "bison", "bc", "libelf-dev", "libssl-dev",
                "xz-utils"}
GUEST_USERSPACE = {"busybox-static", "e2fsprogs"}
PYTHON = {"python3", "python3-venv", "python3-dev"}


def _print(*jobs: str, software_kvm: bool = False, tmp_path: Path) -> list[str]:
    # deps.sh looks for the software KVM's module here instead of in /sys/module.
    sys_module = tmp_path / ("sys-module-software" if software_kvm else "sys-module-hardware")
    sys_module.mkdir(exist_ok=True)
    if software_kvm:
        (sys_module / "kvm_pvm").mkdir(exist_ok=True)
    proc = subprocess.run(["bash", str(DEPS), "--print", *jobs], capture_output=True, text=True, check=False,
                          env={"PATH": "/usr/bin:/bin", "PYVMM_DEPS_SYS_MODULE": str(sys_module)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    packages = proc.stdout.split()
    assert len(packages) == len(set(packages)), packages
    return packages


def _all_listed() -> set[str]:
    lines = (ln.strip() for ln in APT_DEPS.read_text().splitlines())
    return {ln for ln in lines if ln and not ln.startswith(("#", "["))}


@pytest.mark.parametrize("jobs", [(), ("test",), ("all",)])
def test_default_and_test_install_every_package(jobs: tuple[str, ...], tmp_path: Path) -> None:
    # make deps (and so make test and CI) must keep getting everything.
    packages = set(_print(*jobs, tmp_path=tmp_path))
    assert packages == _all_listed()
    assert packages >= ARM64_ONLY | KERNEL_BUILD | GUEST_USERSPACE | PYTHON | {"qemu-system-x86", "acpica-tools"}


def test_run_on_a_hardware_kvm_host_is_the_default_guest_build_only(tmp_path: Path) -> None:
    packages = set(_print("run", tmp_path=tmp_path))
    assert packages >= KERNEL_BUILD | GUEST_USERSPACE | PYTHON
    assert not packages & (ARM64_ONLY | {"qemu-system-x86", "acpica-tools", "linux-libc-dev"})


def test_run_on_a_software_kvm_host_adds_the_x86_lab(tmp_path: Path) -> None:
    packages = set(_print("run", software_kvm=True, tmp_path=tmp_path))
    assert packages >= KERNEL_BUILD | GUEST_USERSPACE | PYTHON | {"qemu-system-x86"}
    assert not packages & (ARM64_ONLY | {"acpica-tools"})


def test_each_job_gets_its_own_packages(tmp_path: Path) -> None:
    lab = set(_print("lab", tmp_path=tmp_path))
    assert lab >= KERNEL_BUILD | PYTHON | {"qemu-system-x86"} and not lab & (ARM64_ONLY | GUEST_USERSPACE)
    arm64 = set(_print("arm64", tmp_path=tmp_path))
    assert arm64 >= ARM64_ONLY | KERNEL_BUILD | GUEST_USERSPACE and "qemu-system-x86" not in arm64
    images = set(_print("images", tmp_path=tmp_path))
    assert images == KERNEL_BUILD | GUEST_USERSPACE | PYTHON | {"cpio"}
    firmware = set(_print("firmware", tmp_path=tmp_path))
    assert firmware == PYTHON | {"binutils"}
    bench = set(_print("bench", tmp_path=tmp_path))
    assert bench == images | lab | firmware
    # Several jobs: the union, each package once.
    assert set(_print("images", "arm64", tmp_path=tmp_path)) == images | arm64


def test_unknown_job_is_refused() -> None:
    proc = subprocess.run(["bash", str(DEPS), "--print", "nonsense"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "unknown job nonsense" in proc.stderr and "run" in proc.stderr and proc.stdout == ""
