"""Fixed values that make the outputs byte-reproducible (every target's cache key includes this module)."""

from __future__ import annotations

import os
import time

EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "1700000000"))


def repro_env() -> dict[str, str]:
    """The environment of every build command: the fixed time, locale and kernel build identity."""
    env = dict(os.environ)
    env.update(
        SOURCE_DATE_EPOCH=str(EPOCH),
        E2FSPROGS_FAKE_TIME=str(EPOCH),
        LC_ALL="C",
        TZ="UTC",
        KBUILD_BUILD_TIMESTAMP=time.strftime("%Y-%m-%d", time.gmtime(EPOCH)),
        KBUILD_BUILD_USER="pyvmm",
        KBUILD_BUILD_HOST="pyvmm",
        KBUILD_BUILD_VERSION="1",
    )
    return env
