"""`pgflow embedded`: the persistent cluster behind `pgflow demo` can be managed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

# starts and stops an embedded cluster
pytestmark = pytest.mark.slow

PGFLOW = str(Path(sys.executable).with_name("pgflow"))


def _pgflow(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGFLOW_HOME": str(home)}
    return subprocess.run(
        [PGFLOW, "embedded", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_embedded_start_status_stop() -> None:
    home = Path(tempfile.mkdtemp(prefix="pgflow-home-"))
    os.chmod(home, 0o755)  # the server may run as another user: it must enter here
    try:
        assert _pgflow(home, "status").returncode == 3  # not initialised yet
        started = _pgflow(home, "start")
        assert started.returncode == 0, started.stderr
        dsn = started.stdout.strip()
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        status = _pgflow(home, "status")
        assert status.returncode == 0 and status.stdout.startswith("running")
        assert _pgflow(home, "dsn").stdout.strip() == dsn
        assert _pgflow(home, "stop").returncode == 0
        assert _pgflow(home, "status").stdout.startswith("stopped")
    finally:
        _pgflow(home, "stop")
        shutil.rmtree(home, ignore_errors=True)
