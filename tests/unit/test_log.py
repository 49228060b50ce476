"""pyvmm.log: loggers that import logging at the first message, and the CLI's configuration applied then."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


def test_nothing_is_imported_until_the_first_message_which_is_then_configured() -> None:
    proc = _run("import sys\n"
                "from pyvmm import log\n"
                "lg = log.get_logger('pyvmm.x')\n"
                "log.configure(log.INFO)\n"
                "print('logging' in sys.modules)\n"
                "lg.debug('hidden'); lg.info('shown %d', 1)\n"
                "print('logging' in sys.modules, lg.real is sys.modules['logging'].getLogger('pyvmm.x'))\n")
    assert proc.stdout.split() == ["False", "True", "True"]
    assert proc.stderr == "pyvmm: shown 1\n"  # the CLI's format and level, applied at the first message


def test_configure_applies_at_once_when_logging_is_already_there() -> None:
    proc = _run("import logging\n"
                "from pyvmm import log\n"
                "log.configure(log.WARNING)\n"
                "logging.getLogger('other').warning('direct')\n"
                "log.get_logger('pyvmm.y').info('hidden')\n")
    assert proc.stderr == "pyvmm: direct\n"


def test_records_reach_caplog_under_the_modules_name(caplog: object) -> None:
    import logging

    import pytest

    from pyvmm import log

    assert isinstance(caplog, pytest.LogCaptureFixture)
    with caplog.at_level(logging.WARNING, logger="pyvmm.bus"):
        log.get_logger("pyvmm.bus").warning("guest wrote %#x", 0x3F8)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("pyvmm.bus", "guest wrote 0x3f8")]


def test_messages_below_the_level_import_nothing() -> None:
    """A message the configuration would drop costs no import of logging: below the CLI's level, or below
    WARNING (logging's own default) when nothing configured it."""
    proc = _run("import sys\n"
                "from pyvmm import log\n"
                "lg = log.get_logger('pyvmm.x')\n"
                "lg.info('dropped'); lg.debug('dropped')\n"
                "print('logging' in sys.modules, lg.isEnabledFor(log.INFO))\n"
                "log.configure(log.ERROR)\n"
                "lg.warning('dropped')\n"
                "print('logging' in sys.modules, lg.isEnabledFor(log.ERROR))\n"
                "lg.error('shown')\n"
                "print('logging' in sys.modules)\n")
    assert proc.stdout.split() == ["False", "False", "False", "True", "True"]
    assert proc.stderr == "pyvmm: shown\n"


def test_without_configuration_warnings_still_reach_stderr() -> None:
    proc = _run("from pyvmm import log\n"
                "lg = log.get_logger('pyvmm.x')\n"
                "lg.info('dropped'); lg.warning('shown %s', 'once')\n")
    assert proc.stderr == "shown once\n"  # logging's last-resort handler, as without pyvmm.log
