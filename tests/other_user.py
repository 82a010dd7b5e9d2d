"""A real second local user for attacks that need one: "nobody" (uid 65534), via setpriv(1).

Planting a link or a file in a shared sticky directory (``/tmp``, ``/var/tmp``, a
shared log directory) is what another local user can do to a kvbm running as
root; the tests do exactly that, as that user, instead of faking ownership.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = 65534

needs_other_user = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="acting as another user needs root and setpriv(1)",
)


def as_nobody(*cmd: str) -> None:
    """Run ``cmd`` as uid/gid 65534 with no supplementary groups."""
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
                   check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A sticky, world-writable directory that "nobody" can reach, like ``/var/tmp``
    (pytest's own tmp_path is under a 0700 directory "nobody" cannot enter)."""
    path = Path(tempfile.mkdtemp(prefix="kvbm-shared-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
