"""pyvmm.lab without starting QEMU: the console filter, the QEMU command line, the run script, and the
messages when the lab cannot start."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pyvmm.lab import qemu, tsc
from pyvmm.lab.__main__ import _writable_disk_dirs
from pyvmm.lab.qemu import ConsoleFilter, LabError, LabOptions

CONSOLE = (b"[    0.1] boot noise\r\nqemu: warning\r\nPYVMM-LAB: start 1.25\r\nline one\r\n"
           b"partial PYVMM-LAB without marker\r\nno newline at the end PYVMM-LAB: exit 3 4.5\r\n"
           b"[    4.6] reboot: Restarting system\r\n")
COMMAND_OUTPUT = b"line one\npartial PYVMM-LAB without marker\nno newline at the end "


def _filter(chunks: list[bytes]) -> tuple[bytes, ConsoleFilter]:
    out = bytearray()
    f = ConsoleFilter(out.extend)
    for c in chunks:
        f.feed(c)
    f.finish()
    return bytes(out), f


@pytest.mark.parametrize("size", [1, 2, 3, 7, 11, len(CONSOLE)])
def test_console_filter_shows_only_the_command_output(size: int) -> None:
    out, f = _filter([CONSOLE[i : i + size] for i in range(0, len(CONSOLE), size)])
    assert out == COMMAND_OUTPUT
    assert [m for _, m in f.marks] == [b"PYVMM-LAB: start 1.25", b"PYVMM-LAB: exit 3 4.5"]
    assert b"boot noise" in f.boot_log and b"Restarting system" in f.boot_log
    assert f.state == "done"


def test_console_filter_keeps_everything_when_the_lab_never_starts() -> None:
    out, f = _filter([b"Kernel panic - not syncing: VFS: Unable to mount root fs\r\n", b"no newline"])
    assert out == b""
    assert f.boot_log.endswith(b"no newline") and b"Kernel panic" in f.boot_log
    assert f.marks == []


def test_qemu_command_is_the_measured_lab(tmp_path: Path) -> None:
    cmd = qemu.qemu_command(Path("/k/lab-bzImage"), tmp_path, [Path("/srv/disks")], memory="3G",
                              interactive=False, verbose=False)
    joined = " ".join(cmd)
    for piece in ("-M microvm,acpi=off", "-accel tcg", "-cpu EPYC,+svm,+npt", "-smp 1", "-no-reboot",
                  "readonly=on", "mount_tag=host", "mount_tag=scratch", "mount_tag=rw0", "-serial stdio"):
        assert piece in joined
    append = cmd[cmd.index("-append") + 1].split()
    assert "reboot=t" in append and "root=host" in append and "rootfstype=9p" in append and "ro" in append
    assert f"PYVMM_LAB_SCRATCH={tmp_path}" in append and "PYVMM_LAB_MOUNTS=rw0:/srv/disks" in append
    assert f"init={qemu.INIT_SCRIPT}" in append
    assert "--" not in append  # QEMU appends virtio_mmio.device= after it: they must stay kernel parameters
    interactive = qemu.qemu_command(Path("/k"), tmp_path, [], memory="1G", interactive=True, verbose=True)
    assert "stdio,id=con,signal=off" in interactive and "quiet" not in " ".join(interactive)


def test_paths_for_the_kernel_command_line_must_be_plain(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="absolute path"):
        qemu.qemu_command(Path("/k"), tmp_path / "with space", [], memory="1G", interactive=False,
                            verbose=False)


def test_run_script_quotes_arguments_and_environment(tmp_path: Path) -> None:
    script = qemu._run_script(["/usr/bin/printf", "%s|", "a b", "$HOME", "it's"], tmp_path,
                                {"LAB_X": "x y 'z'", "PWD": "/nowhere", "bad-name": "1"}, None)
    assert "PWD" not in script and "bad-name" not in script
    (tmp_path / "run.sh").write_text(script.replace("exec ", "printf '%s|' \"$LAB_X\" \"$(pwd)\"; exec "))
    out = subprocess.run(["/bin/sh", str(tmp_path / "run.sh")], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"}).stdout
    assert out == f"x y 'z'|{tmp_path}|a b|$HOME|it's|"


def test_lab_unavailable_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-lab-bzImage"
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "apt-get install qemu-system-x86" in (qemu.unavailable_reason(missing) or "")
    fake_qemu = tmp_path / qemu.QEMU
    fake_qemu.write_text("#!/bin/sh\n")
    fake_qemu.chmod(0o755)
    assert "images/lab.py" in (qemu.unavailable_reason(missing) or "")
    with pytest.raises(LabError, match="lab kernel"):
        qemu.run(LabOptions(command=["true"], kernel=missing))
    missing.write_bytes(b"")
    assert qemu.unavailable_reason(missing) is None
    with pytest.raises(LabError, match="command not found"):
        qemu.run(LabOptions(command=["no-such-command-here"], kernel=missing))


def test_lab_kernel_message_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An installed pyvmm (a wheel) has no images/ next to it: the message says how to give it a lab kernel
    # instead of naming a path inside site-packages and a build script that is not there.
    fake_qemu = tmp_path / qemu.QEMU
    fake_qemu.write_text("#!/bin/sh\n")
    fake_qemu.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    site = tmp_path / "site-packages"
    monkeypatch.setattr(qemu, "REPO", site)
    monkeypatch.setattr(qemu, "LAB_KERNEL", site / "images" / "out" / "lab-bzImage")
    monkeypatch.delenv("PYVMM_LAB_KERNEL", raising=False)
    reason = qemu.unavailable_reason() or ""
    assert "PYVMM_LAB_KERNEL" in reason and "make lab-images" in reason and str(site) not in reason
    monkeypatch.setenv("PYVMM_LAB_KERNEL", str(tmp_path / "gone"))
    assert f"{tmp_path / 'gone'} (from $PYVMM_LAB_KERNEL) is missing" in (qemu.unavailable_reason() or "")
    (tmp_path / "gone").write_bytes(b"")
    assert qemu.unavailable_reason() is None
    # In a checkout the message names the build script, as before.
    monkeypatch.setattr(qemu, "REPO", Path(qemu.__file__).resolve().parents[2])
    monkeypatch.delenv("PYVMM_LAB_KERNEL")
    assert "images/lab.py" in (qemu.unavailable_reason() or "")


def test_writable_disks_are_shared() -> None:
    args = ["--kernel", "/k", "--disk", "path=/a/root.ext4", "--disk", "path=/b/data.img,readonly=on",
            "--disk=path=/c/x.img,serial=s", "--disk", "path=/d/base.img,snapshot=on", "--memory", "1G"]
    assert _writable_disk_dirs(args) == [Path("/a"), Path("/c")]  # a snapshot disk only reads its image


def test_lab_kernel_is_told_the_tsc_frequency(tmp_path: Path) -> None:
    # Under host load the lab kernel's own TSC calibration (against the PIT; microvm has no HPET or ACPI PM
    # timer) fails, tsc_khz stays 0 and the lab's KVM then never enters a guest.  The runner measures the
    # host TSC (TCG's guest TSC is the host's) and passes it, so calibration cannot fail.
    cmd = qemu.qemu_command(Path("/k"), tmp_path, [], memory="1G", interactive=False, verbose=False)
    append = cmd[cmd.index("-append") + 1].split()
    khz = [int(a.split("=", 1)[1]) for a in append if a.startswith("tsc_early_khz=")]
    if tsc.host_tsc_khz() is None:
        assert khz == []
        pytest.skip("no way to measure this host's TSC (not x86_64)")
    assert len(khz) == 1 and khz[0] > 0


def test_host_tsc_measurement_is_consistent() -> None:
    first = tsc.measure_tsc_khz()
    if first is None:
        pytest.skip("not an x86_64 host: no TSC to measure")
    second = tsc.measure_tsc_khz()
    assert second is not None
    assert 100_000 <= first <= 10_000_000  # 100 MHz .. 10 GHz
    assert abs(first - second) / first < 0.01


def test_each_architecture_has_one_lab_flavour_and_arm64_names_aarch64(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(qemu.FLAVOURS) == set(qemu.ARCHES) == {"x86_64", "aarch64"}
    monkeypatch.setattr(qemu.shutil, "which", lambda name, path=None: None)
    assert qemu.unavailable_reason(arch="arm64") == qemu.unavailable_reason(arch="aarch64")
    assert "qemu-system-aarch64 is not installed" in (qemu.unavailable_reason(arch="aarch64") or "")
    assert "qemu-system-x86_64 is not installed" in (qemu.unavailable_reason(arch="x86_64") or "")
    assert qemu.unavailable_reason(arch="riscv64") == "no riscv64 lab: the labs are x86_64, aarch64"


def test_the_aarch64_lab_runs_its_command_in_its_own_root(tmp_path: Path) -> None:
    rw: list[Path] = []
    env, argv = qemu.FLAVOURS["aarch64"].prepare(LabOptions(command=["python3", "-c", "pass"]), tmp_path, rw)
    assert argv == ["python3", "-c", "pass"]  # resolved inside the arm64 root, not on this host
    assert env["PATH"] == qemu.AARCH64_PATH and env["PYTHONPATH"] == str(qemu.REPO) and rw == [qemu.REPO]
    with pytest.raises(LabError, match="no command given"):
        qemu.FLAVOURS["aarch64"].prepare(LabOptions(command=[]), tmp_path, [])
    cmd = qemu.FLAVOURS["aarch64"].qemu_command(Path("/k/Image"), tmp_path, [], memory="2G", interactive=False,
                                                verbose=False)
    assert cmd[0] == "qemu-system-aarch64" and cmd[cmd.index("-kernel") + 1] == "/k/Image"
    assert "virtualization=on" in cmd[cmd.index("-M") + 1]
