"""What ``pyvmm run`` imports before its first KVM_RUN: every module costs start-up time (tens of times
more inside the KVM lab's emulated CPU), so the heavy ones that a boot does not need stay out."""

from __future__ import annotations

import subprocess
import sys


def test_run_path_leaves_out_the_heavy_libraries() -> None:
    """numpy, the codecs and the ELF library; dataclasses, which imports inspect, ast and dis (the records
    of the run path are pyvmm.record's); logging with traceback and tokenize (pyvmm.log imports it at
    the first message); typing (pyvmm.statictypes); pathlib, which imports urllib.parse and ipaddress
    (file names are strings on this path)."""
    code = ("import sys, pyvmm.cli, pyvmm.runner, pyvmm.builder, pyvmm.arch.x86_64.board, "
            "pyvmm.devices.virtio.block, pyvmm.devices.virtio.mmio, pyvmm.devices.virtio.snapshot; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'lz4', 'zstandard', 'elftools', "
            "'dataclasses', 'inspect', 'ast', 'dis', 'logging', 'traceback', 'tokenize', 'typing', 'pathlib', 'urllib', 'ipaddress')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    # The Python API starts VMs through the CLI; its own imports stay light too (pexpect brings traceback).
    code = ("import sys, pyvmm.api; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'dataclasses', 'inspect')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_run_path_leaves_out_what_only_some_runs_need() -> None:
    """The gdb server, the TOML parser, the bzImage decompressors, the virtio devices, the emulation assist,
    the exit statistics, the symbol reader and the JSON and base64 codecs are imported by the runs that use
    them (--gdb, --config, a bzImage kernel, --disk, a software KVM, --stats, a stop report, `config
    --print`, --exec)."""
    code = ("import sys, pyvmm.cli, pyvmm.runner, pyvmm.builder, pyvmm.arch.x86_64.board; "
            "print(sorted(m for m in sys.modules if m.startswith(('pyvmm.gdb', 'pyvmm.arch.x86_64.gdbtarget', "
            "'pyvmm.arch.x86_64.debugprobe', 'tomllib', 'socket', 'pyvmm.arch.x86_64.bzimage', "
            "'pyvmm.loader.decompress', 'lzma', 'bz2', 'pyvmm.devices.virtio', 'pyvmm.arch.x86_64.assist', "
            "'pyvmm.exitstats', 'pyvmm.loader.symbols', 'json', 'base64'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
