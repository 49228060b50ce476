"""Targets and their cache entries.

Every target is built once into ``${XDG_CACHE_HOME:-~/.cache}/pyvmm/<target>-<hash>/``, where the hash
covers the target's inputs (:attr:`Target.inputs`); when that directory exists nothing is rebuilt and the
files are only copied into ``images/out/``, with a JSON manifest ``<target>.inputs`` naming the hash and
the inputs.  A build goes into a temporary directory beside it and is renamed into place only when it is
complete, so an interrupted build leaves no entry behind.
"""

from __future__ import annotations

import filecmp
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FunctionType, ModuleType

from imagelib import repro

T0 = time.monotonic()


class BuildError(Exception):
    pass


def log(target: str, msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {target}: {msg}", flush=True)


def run(cmd: Sequence[str | Path], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command, return its stdout; on failure raise with its output."""
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise BuildError(f"{cmd[0]}: not installed ({exc})") from None
    if proc.returncode != 0:
        raise BuildError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def dpkg_version(pkg: str) -> str:
    """The installed version of a host Debian package (part of the cache keys of what it builds)."""
    try:
        out = run(["dpkg-query", "-W", "-f=${Version}", pkg])
    except BuildError as exc:
        raise BuildError(f"Debian package {pkg} is not installed (see images/requirements-apt.txt)") from exc
    if not out:
        raise BuildError(f"Debian package {pkg} is not installed (see images/requirements-apt.txt)")
    return out


def code_inputs(*code: ModuleType | FunctionType | Callable[..., object]) -> dict[str, bytes]:
    """Cache-key entries for the code that builds a target: the source text of each module or function,
    and always :mod:`imagelib.repro`.  A change to that code rebuilds the target; a change elsewhere does
    not."""
    out = {"epoch": str(repro.EPOCH).encode()}
    for obj in (repro, *code):
        name = obj.__name__ if isinstance(obj, ModuleType) else f"{obj.__module__}.{obj.__qualname__}"
        out[f"code:{name}"] = inspect.getsource(obj).encode()
    return out


@dataclass
class Target:
    name: str
    # name -> bytes whose digest goes into the cache key
    inputs: Callable[[], dict[str, bytes]]
    # builds into the given (empty) directory
    build: Callable[[Path], None]
    # file in the cache entry -> path under images/out/
    outputs: dict[str, str] = field(default_factory=dict)


def input_hash(inputs: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for key in sorted(inputs):
        h.update(key.encode() + b"\0" + hashlib.sha256(inputs[key]).hexdigest().encode() + b"\n")
    return h.hexdigest()[:16]


def describe_inputs(inputs: dict[str, bytes]) -> dict[str, str]:
    """The manifest's view of the inputs: versions verbatim, files and code by sha256."""
    return {
        k: (v.decode() if k.startswith("dpkg:") or k == "epoch" else "sha256:" + hashlib.sha256(v).hexdigest())
        for k, v in sorted(inputs.items())
    }


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyvmm"


def install(target: Target, cached: Path, out: Path) -> bool:
    """Copy the cached outputs into ``out`` (images/out/); return True if anything changed."""
    changed = False
    for src_name, out_name in target.outputs.items():
        src, dst = cached / src_name, out / out_name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists() and filecmp.cmp(src, dst, shallow=False):
            continue
        # A copy, not a hard link: images/out/rootfs.ext4 may be written to by a guest.
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copy2(src, tmp)
        tmp.replace(dst)
        changed = True
    return changed


def build_target(target: Target, force: bool, out: Path) -> tuple[Path, str]:
    """Build ``target`` unless its cache entry exists, install its outputs under ``out``, write its
    manifest; return the cache entry and the hash."""
    inputs = target.inputs()
    digest = input_hash(inputs)
    cached = cache_root() / f"{target.name}-{digest}"
    if force and cached.exists():
        shutil.rmtree(cached)
    if cached.is_dir():
        log(target.name, f"cached: {cached}")
    else:
        cached.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{target.name}-{digest}.tmp-", dir=cached.parent))
        start = time.monotonic()
        log(target.name, f"building into {work}")
        try:
            target.build(work)
            missing = [name for name in target.outputs if not (work / name).is_file()]
            if missing:
                raise BuildError(f"build produced no {', '.join(missing)}")
            work.replace(cached)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        log(target.name, f"built in {time.monotonic() - start:.0f}s")
    out.mkdir(parents=True, exist_ok=True)
    changed = install(target, cached, out)
    manifest = {
        "target": target.name,
        "hash": digest,
        "cache_dir": str(cached),
        "inputs": describe_inputs(inputs),
        "files": {
            out_name: {
                "size": (out / out_name).stat().st_size,
                "sha256": hashlib.sha256((out / out_name).read_bytes()).hexdigest(),
            }
            for out_name in target.outputs.values()
        },
    }
    manifest_path = out / f"{target.name}.inputs"
    text = json.dumps(manifest, indent=2) + "\n"
    if not manifest_path.exists() or manifest_path.read_text() != text:
        manifest_path.write_text(text)
    files = ", ".join(target.outputs.values())
    log(target.name, f"{'installed' if changed else 'up to date'}: images/out/{{{files}}} (hash {digest})")
    return cached, digest
