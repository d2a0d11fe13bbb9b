"""`pgflow worker` options: the connection budget is configurable and validated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgflow.cli._worker import build_workflow
from pgflow.errors import BuildError, ConfigError

PGFLOW = str(Path(sys.executable).with_name("pgflow"))
ROOT = Path(__file__).resolve().parent.parent


def test_pool_size_applies_to_builders_and_workflows() -> None:
    dsn = "postgresql://postgres@127.0.0.1:5432/unused"  # nothing connects here
    assert build_workflow("tests.workflow_app:builder", dsn, 3).engine.pool_size == 3
    assert build_workflow("tests.workflow_app:wf", dsn, 4).engine.pool_size == 4
    assert build_workflow("tests.workflow_app:builder", dsn).engine.pool_size == 10
    with pytest.raises(BuildError, match="pool_size must be at least 2"):
        build_workflow("tests.workflow_app:builder", dsn, 1)
    with pytest.raises(ConfigError, match="at least 2"):
        build_workflow("tests.workflow_app:wf", dsn, 1)


def test_bad_pool_size_env_is_a_one_line_error() -> None:
    env = {**os.environ, "PGFLOW_POOL_SIZE": "lots", "PGFLOW_DATABASE_URL": "postgresql:///x"}
    result = subprocess.run(
        [PGFLOW, "worker", "tests.workflow_app:builder"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "pgflow: error: PGFLOW_POOL_SIZE must be a whole number, not 'lots'"
    )
