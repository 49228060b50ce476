"""Debian packages of another architecture (arm64), without touching the host's dpkg.

A private apt state in ``${XDG_CACHE_HOME:-~/.cache}/pyvmm/apt-<arch>/`` (its own sources.list, lists,
package cache and an empty dpkg status); ``-o Dir::...=`` options on every apt command point apt there,
with ``APT::Architecture`` set, while the host's other apt settings (a proxy) still apply.  Signatures
are checked against debian-archive-keyring; mirrors: deb.debian.org, or ``$PYVMM_DEBIAN_MIRROR`` and
``$PYVMM_DEBIAN_SECURITY_MIRROR``.  ``resolve`` gives a package set's whole dependency closure as the
mirror has it now (``apt-get -s install`` against the empty status), with each .deb's version and sha256
for the cache key; ``fetch`` downloads them (kept, checked against the index); ``unpack_deb`` extracts one
onto existing directory symlinks, as dpkg and mmdebstrap do.  No maintainer script runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from imagelib.cache import BuildError, cache_root, log, run

DEBIAN_MIRROR = os.environ.get("PYVMM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SECURITY_MIRROR = os.environ.get(
    "PYVMM_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security"
)
SUITE = "bookworm"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    arch: str
    filename: str  # pool path on the mirror
    sha256: str

    @property
    def local_name(self) -> str:
        return Path(self.filename).name

    def key(self) -> tuple[str, bytes]:
        """A cache-key entry; "dpkg:" keys are shown verbatim in the .inputs manifest."""
        return f"dpkg:{self.name}:{self.arch}", f"{self.version} sha256:{self.sha256}".encode()


class DebianApt:
    """A private apt state for Debian bookworm ``arch`` packages (module docstring)."""

    def __init__(self, arch: str) -> None:
        self.arch = arch
        self.dir = cache_root() / f"apt-{arch}"
        self.archives = self.dir / "archives"
        self.updated = False

    def _setup(self) -> None:
        for sub in ("lists/partial", "cache", "archives/partial", "etc/preferences.d", "etc/sources.list.d"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        status = self.dir / "status"
        if not status.exists():
            status.write_text("")  # nothing installed: -s install shows the whole dependency closure
        if not KEYRING.is_file():
            raise BuildError(f"{KEYRING} is missing (Debian package debian-archive-keyring)")
        opts = f"[arch={self.arch} signed-by={KEYRING}]"
        sources = (
            f"deb {opts} {DEBIAN_MIRROR} {SUITE} main\n"
            f"deb {opts} {DEBIAN_MIRROR} {SUITE}-updates main\n"
            f"deb {opts} {DEBIAN_SECURITY_MIRROR} {SUITE}-security main\n"
        )
        path = self.dir / "etc/sources.list"
        if not path.exists() or path.read_text() != sources:
            path.write_text(sources)

    def options(self) -> list[str]:
        """apt options on the command line, where they override the host's apt.conf(.d) (whose other
        settings, e.g. a proxy, still apply; some hosts turn the package cache off there)."""
        d = self.dir
        opts = {
            "APT::Architecture": self.arch,
            "APT::Architectures": self.arch,
            "APT::Install-Recommends": "false",
            "APT::Sandbox::User": "root",
            "Acquire::Languages": "none",
            "Dir::State": d,
            "Dir::State::Lists": d / "lists",
            "Dir::State::status": d / "status",
            "Dir::Cache": d / "cache",
            "Dir::Cache::pkgcache": d / "cache/pkgcache.bin",
            "Dir::Cache::srcpkgcache": d / "cache/srcpkgcache.bin",
            "Dir::Cache::archives": self.archives,
            "Dir::Etc::SourceList": d / "etc/sources.list",
            "Dir::Etc::SourceParts": d / "etc/sources.list.d",
            "Dir::Etc::Preferences": d / "etc/preferences",
            "Dir::Etc::PreferencesParts": d / "etc/preferences.d",
        }
        return [a for k, v in opts.items() for a in ("-o", f"{k}={v}")]

    def apt(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
        return run([tool, *self.options(), *args], cwd=cwd, env=env)

    def update(self) -> None:
        if self.updated:
            return
        self._setup()
        try:
            self.apt("apt-get", "-q", "update")
            log(f"apt-{self.arch}", f"indexes updated ({self.dir})")
        except BuildError as exc:
            if not any((self.dir / "lists").glob("*_Packages*")):
                raise BuildError(f"cannot fetch the Debian {self.arch} package indexes:\n{exc}") from exc
            log(f"apt-{self.arch}", "warning: `apt-get update` failed; using the indexes downloaded last time")
        self.updated = True

    def resolve(self, packages: Sequence[str]) -> list[Deb]:
        """The packages and their whole dependency closure (no Recommends), as the mirror has them now."""
        self.update()
        out = self.apt("apt-get", "-s", "-q", "install", *packages)
        inst = re.findall(r"^Inst (\S+) (?:\[\S+\] )?\((\S+) [^[]*\[(\S+)\]\)", out, re.M)
        if not inst:
            raise BuildError(f"apt-get -s install {' '.join(packages)} resolved nothing:\n{out}")
        show = self.apt("apt-cache", "show", *(f"{name}={version}" for name, version, _ in inst))
        fields: dict[tuple[str, str], dict[str, str]] = {}
        for stanza in show.split("\n\n"):
            stanza_fields = dict(re.findall(r"^([\w-]+): (.*)$", stanza, re.M))
            if "Package" in stanza_fields:
                fields.setdefault((stanza_fields["Package"], stanza_fields["Version"]), stanza_fields)
        debs = []
        for name, version, arch in inst:
            f = fields.get((name, version), {})
            if "SHA256" not in f or "Filename" not in f:
                raise BuildError(f"apt-cache show {name}={version}: no Filename/SHA256")
            debs.append(Deb(name, version, arch, f["Filename"], f["SHA256"]))
        return sorted(debs, key=lambda d: d.name)

    def fetch(self, debs: Iterable[Deb]) -> dict[str, Path]:
        """Download (or reuse) the .debs in apt-<arch>/archives/; {package name: path}."""
        debs = list(debs)
        have = {d.name: self.archives / d.local_name for d in debs}
        missing = [d for d in debs if not (have[d.name].is_file() and sha256_file(have[d.name]) == d.sha256)]
        if missing:
            log(f"apt-{self.arch}", f"downloading {len(missing)} package(s): {', '.join(d.name for d in missing)}")
            with tempfile.TemporaryDirectory(dir=self.archives / "partial") as tmp:
                self.apt(
                    "apt-get", "-q", "download", *(f"{d.name}={d.version}" for d in missing), cwd=Path(tmp)
                )
                by_hash = {sha256_file(p): p for p in Path(tmp).glob("*.deb")}
                for d in missing:
                    if d.sha256 not in by_hash:
                        raise BuildError(
                            f"apt-get download {d.name}={d.version}: no file with sha256 {d.sha256}"
                        )
                    by_hash[d.sha256].replace(have[d.name])
        return have


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def unpack_deb(deb: Path, dest: Path, *members: str) -> None:
    """dpkg-deb --fsys-tarfile DEB | tar -x (onto existing directory symlinks, as dpkg and mmdebstrap do)."""
    dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    tar = subprocess.run(
        ["tar", "-x", "--keep-directory-symlink", "--warning=no-timestamp", "-C", str(dest), "-f", "-", *members],
        stdin=dpkg.stdout, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert dpkg.stdout is not None
    dpkg.stdout.close()
    if dpkg.wait() != 0 or tar.returncode != 0:
        raise BuildError(f"unpacking {deb.name} failed:\n{tar.stderr}")


def deb_member(deb: Path, member: str) -> bytes:
    dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    tar = subprocess.run(
        ["tar", "-xO", "-f", "-", member], stdin=dpkg.stdout, capture_output=True, check=False
    )
    assert dpkg.stdout is not None
    dpkg.stdout.close()
    if dpkg.wait() != 0 or tar.returncode != 0:
        raise BuildError(f"{deb.name} has no {member}: {tar.stderr.decode(errors='replace')}")
    return tar.stdout
