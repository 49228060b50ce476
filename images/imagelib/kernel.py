"""A Linux kernel from Debian's linux-source package and a config fragment.

The recipe, the same for every kernel the scripts build (the x86 guest, the x86 lab, the arm64 guest):
extract the tarball, ``make tinyconfig``, ``scripts/kconfig/merge_config.sh -m .config FRAGMENT``,
``make olddefconfig``, check that every option of the fragment survived (a dependency the fragment lacks
drops an option silently otherwise), then ``make`` the asked-for targets with a progress line every
PROGRESS_INTERVAL_S.  The caller copies what it needs out of the tree; the tree is removed afterwards.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from imagelib.cache import BuildError, dpkg_version, log, run
from imagelib.repro import repro_env

KERNEL_SOURCE_PKG = "linux-source-6.1"
KERNEL_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
PROGRESS_INTERVAL_S = 30.0


def parse_fragment(path: Path) -> tuple[dict[str, str], set[str]]:
    """The fragment's ``CONFIG_X=v`` lines and its ``# CONFIG_X is not set`` lines."""
    wanted: dict[str, str] = {}
    unset: set[str] = set()
    for line in path.read_text().splitlines():
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line.strip()):
            wanted[m[1]] = m[2]
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line.strip()):
            unset.add(m[1])
    return wanted, unset


def check_config(config: Path, fragment: Path) -> None:
    """Fail loudly if an option of the fragment did not survive olddefconfig."""
    final: dict[str, str] = {}
    for line in config.read_text().splitlines():
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            final[m[1]] = m[2]
    wanted, unset = parse_fragment(fragment)
    problems = [
        f"  {sym}={val} requested, final .config has {sym}={final[sym]}"
        if sym in final
        else f"  {sym}={val} requested, final .config has it unset (a dependency is missing?)"
        for sym, val in wanted.items()
        if final.get(sym) != val
    ]
    problems += [
        f"  {sym} requested unset, final .config has {sym}={final[sym]}" for sym in unset if sym in final
    ]
    if problems:
        raise BuildError(
            "kernel config options did not survive `make olddefconfig`:\n"
            + "\n".join(problems)
            + f"\n(fragment: {fragment}, final config: {config})"
        )


def make_with_progress(target: str, args: Sequence[str], cwd: Path, env: dict[str, str]) -> None:
    """Run make, printing a summary line every PROGRESS_INTERVAL_S and warnings/errors as they come."""
    log(target, "$ make " + " ".join(args))
    proc = subprocess.Popen(
        ["make", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        errors="replace",
    )  # fmt: skip
    assert proc.stdout is not None
    counts: collections.Counter[str] = collections.Counter()
    tail: collections.deque[str] = collections.deque(maxlen=60)
    last_line = ""
    next_report = time.monotonic() + PROGRESS_INTERVAL_S
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        tail.append(line)
        words = line.split()
        if len(words) >= 2 and words[0].isupper() and words[0].isalnum():
            counts[words[0]] += 1
            last_line = line.strip()
        elif "warning:" in line or "error:" in line or line.startswith("make"):
            print(f"    | {line}", flush=True)
        if time.monotonic() >= next_report:
            next_report = time.monotonic() + PROGRESS_INTERVAL_S
            top = ", ".join(f"{k} {v}" for k, v in counts.most_common(4))
            log(target, f"make: {sum(counts.values())} steps ({top}); last: {last_line}")
    rc = proc.wait()
    if rc != 0:
        sys.stdout.write("".join(f"    | {t}\n" for t in tail))
        raise BuildError(f"make {' '.join(args)} failed with exit status {rc}")
    top = ", ".join(f"{k} {v}" for k, v in counts.most_common(6))
    log(target, f"make finished: {sum(counts.values())} steps ({top})")


@contextlib.contextmanager
def built_tree(target: str, dest: Path, fragment: Path, make_targets: Sequence[str], *,
               env: dict[str, str] | None = None, expected_warnings: Sequence[str] = ()) -> Iterator[Path]:
    """The kernel source tree under ``dest``, configured from ``fragment`` and with ``make_targets`` built;
    removed when the block ends.  ``env``: extra make variables (ARCH, CROSS_COMPILE); merge_config
    warnings that contain one of ``expected_warnings`` are not shown."""
    env = {**repro_env(), **(env or {})}
    src = dest / "build"
    src.mkdir()
    log(target, f"extracting {KERNEL_TARBALL} ({dpkg_version(KERNEL_SOURCE_PKG)})")
    run(["tar", "-xJf", KERNEL_TARBALL, "-C", src, "--strip-components=1"])
    log(target, "make tinyconfig" + (f" (ARCH={env['ARCH']})" if "ARCH" in env else ""))
    run(["make", "tinyconfig"], cwd=src, env=env)
    log(target, f"merge_config.sh -m .config {fragment.name}")
    merge_out = run(["scripts/kconfig/merge_config.sh", "-m", ".config", fragment], cwd=src, env=env)
    for line in merge_out.splitlines():
        if line.startswith(("Value of", "Previous value", "New value")):
            continue  # the fragment overriding tinyconfig's values: what it is for
        if "warning" in line.lower() and not any(w in line for w in expected_warnings):
            print(f"    | {line}", flush=True)
    log(target, "make olddefconfig")
    run(["make", "olddefconfig"], cwd=src, env=env)
    check_config(src / ".config", fragment)
    log(target, "all fragment options survived olddefconfig")
    make_with_progress(target, [f"-j{os.cpu_count() or 1}", *make_targets], src, env)
    try:
        yield src
    finally:
        log(target, "removing the build tree")
        shutil.rmtree(src)


def source_inputs(fragment: Path) -> dict[str, bytes]:
    """A kernel's cache-key entries besides its code: the fragment and the source package's version."""
    return {fragment.name: fragment.read_bytes(), f"dpkg:{KERNEL_SOURCE_PKG}": dpkg_version(KERNEL_SOURCE_PKG).encode()}
