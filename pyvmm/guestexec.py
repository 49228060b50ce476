"""Running one command in the guest: ``pyvmm run --exec CMD`` and :meth:`pyvmm.VM.exec`.

The host side is only a kernel command-line argument; the guest side is the default guests' ``/init``
(images/init.sh), which honours it:

- ``pyvmm.exec="CMD"`` (or ``pyvmm.exec=WORD``): run ``sh -c CMD``.  The kernel command line cannot quote
  a double quote, so a command with ``"``, a control character or non-ASCII text goes as
  ``pyvmm.exec64=BASE64`` (standard base64 of its UTF-8 bytes) instead.
- ``/init`` prints ``PYVMM-EXEC: begin`` on the console, runs the command (stdin, stdout and stderr on the
  console), prints ``PYVMM-EXEC: end N`` on a line of its own (a newline first, in case the output did
  not end with one), runs ``sync`` (the command's writes reach the disks), and reports N through the guest
  exit device (pyvmm/devices/guestexit.py).  That ends the VM: pyvmm exits 0 for N = 0, else 32 + N
  (pyvmm.status).  If the device cannot be written it powers the guest off (reboot).

Your own init can do the same with busybox: ``devmem 0xd0009008 32 N`` on x86_64, ``devmem 0x09002008 32 N``
on aarch64.
"""

from __future__ import annotations

import re

from pyvmm.errors import ConfigError

EXEC_KEY = "pyvmm.exec"
EXEC64_KEY = "pyvmm.exec64"
BEGIN_MARK = "PYVMM-EXEC: begin"
END_MARK = "PYVMM-EXEC: end"
# printable ASCII ('"' is refused below); a pattern, compiled (and cached by re) at the first --exec, not
# by every run's import
_PLAIN = r'[\x20-\x7e]+'


def check_exec(cmd: str | None) -> None:
    if cmd is None:
        return
    if not cmd.strip():
        raise ConfigError("--exec needs a command (an empty or blank one was given)")
    if "\0" in cmd:
        raise ConfigError("--exec command contains a NUL byte")


def exec_arg(cmd: str) -> tuple[str, str]:
    """The kernel parameter ``(key, value)`` that asks the guest's /init to run ``cmd``."""
    check_exec(cmd)
    if re.fullmatch(_PLAIN, cmd) and '"' not in cmd:
        return EXEC_KEY, cmd
    import base64  # only for a command the plain form cannot carry

    return EXEC64_KEY, base64.b64encode(cmd.encode()).decode()


def command_output(console_text: str) -> str | None:
    """The command's output in a console transcript (``\\n`` line ends), or None if it never began.

    Everything between the begin line and the end line; kernel messages printed meanwhile are part of it.
    If the end line is missing (the guest died), everything after the begin line.
    """
    text = console_text.replace("\r\n", "\n").replace("\r", "\n")
    start = text.find(BEGIN_MARK + "\n")
    if start < 0:
        return None
    body = text[start + len(BEGIN_MARK) + 1:]
    end = body.rfind("\n" + END_MARK + " ")
    if end < 0:
        return body
    return body[:end]
