"""The embedded cluster as root: only what pgflow creates is handed to the server user.

Issue 10: with ``PGFLOW_HOME=~`` the cluster chowned ``/root`` to ``postgres``. Here a
fresh directory in /tmp plays the user's home: root's, mode 0700 like ``/root``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgflow.errors import ConfigError
from pgflow.postgres import LocalCluster

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the server runs as another user only when pgflow runs as root"
)
PGFLOW = str(Path(sys.executable).with_name("pgflow"))


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pgflow-home-"))  # root's, 0700
    try:
        yield path
    finally:
        subprocess.run(
            [PGFLOW, "embedded", "stop"],
            env={**os.environ, "PGFLOW_HOME": str(path)},
            capture_output=True,
            check=False,
        )
        shutil.rmtree(path, ignore_errors=True)


def _stat(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, st.st_mode


def test_a_home_the_server_cannot_enter_is_refused_in_one_line_and_left_alone(
    home: Path,
) -> None:
    before = _stat(home)
    result = subprocess.run(
        [PGFLOW, "embedded", "start"],
        env={**os.environ, "PGFLOW_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"cannot enter {home}" in lines[0] and "PGFLOW_HOME" in lines[0]
    assert _stat(home) == before  # not chowned, not chmodded
    assert not (home / "postgres").exists()  # and nothing made inside it


@pytest.mark.slow  # starts a cluster
def test_a_reachable_home_keeps_its_owner_and_mode(home: Path) -> None:
    os.chmod(home, 0o751)  # enterable, not listable: the user's choice, kept
    before = _stat(home)
    cluster = LocalCluster(home / "postgres")
    try:
        with psycopg.connect(cluster.start()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        cluster.stop()
    assert _stat(home) == before
    # what pgflow made belongs to the server user
    for made in (home / "postgres", home / "postgres.sock", home / "postgres.log"):
        assert made.owner() == cluster.user, made


@pytest.mark.slow  # starts a cluster
def test_parents_pgflow_creates_are_enterable_but_stay_roots(home: Path) -> None:
    os.chmod(home, 0o755)
    cluster = LocalCluster(home / "a" / "b" / "postgres")
    try:
        cluster.start()
    finally:
        cluster.stop()
    for made in (home / "a", home / "a" / "b"):
        assert made.owner() == "root" and made.stat().st_mode & 0o777 == 0o755


def test_an_existing_data_dir_pgflow_did_not_create_is_not_taken_over(home: Path) -> None:
    os.chmod(home, 0o755)
    (home / "postgres").mkdir()
    before = _stat(home / "postgres")
    with pytest.raises(ConfigError, match="exists and belongs to 'root'"):
        LocalCluster(home / "postgres").start()
    assert _stat(home / "postgres") == before
