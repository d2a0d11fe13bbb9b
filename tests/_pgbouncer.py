"""A real pgbouncer in transaction-pooling mode, started by the tests themselves.

The pooled test group (``tests/test_pooled.py``) runs pgflow through it to prove the
README's claim that pgflow works behind a transaction pooler. The bouncer is made as
hostile as a production one can be: few server connections per database (clients are
multiplexed), and ``server_round_robin`` so consecutive transactions of one client land
on different server connections — anything that needs a session (prepared statements,
session advisory locks, ``SET``, LISTEN) breaks at once instead of by luck.

Needs the ``pgbouncer`` binary (Debian package ``pgbouncer``; ``.ci/run`` installs it).
Without it the pooled tests skip with that reason, unless ``PGFLOW_TEST_PGBOUNCER=
required`` (CI) turns the skip into a failure. Config and auth file live in a temp
dir; the system service is never used.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

#: server connections per (database, user): well below the clients a test opens
POOL_SIZE = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """A running pgbouncer; :meth:`dsn_for` maps a direct DSN to the pooled one."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, workdir: Path) -> None:
        self.proc = proc
        self.port = port
        self.workdir = workdir

    def dsn_for(self, direct: str) -> str:
        """The same database and user, through the bouncer."""
        params = conninfo_to_dict(direct)
        params.pop("password", None)  # the bouncer's [databases] entry logs in upstream
        params.update(host="127.0.0.1", port=str(self.port))
        return make_conninfo("", **params)

    @property
    def log(self) -> str:
        path = self.workdir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _config(server: str, port: int, workdir: Path, pool_size: int, round_robin: bool) -> str:
    upstream = conninfo_to_dict(server)
    target = f"host={upstream.get('host') or '127.0.0.1'} port={upstream.get('port') or 5432}"
    if upstream.get("password"):
        target += f" user={upstream.get('user')} password={upstream['password']}"
    return "\n".join(
        [
            "[databases]",
            f"* = {target}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {workdir / 'userlist.txt'}",
            f"logfile = {workdir / 'pgbouncer.log'}",
            "pool_mode = transaction",
            f"default_pool_size = {pool_size}",
            "max_client_conn = 2000",
            f"server_round_robin = {int(round_robin)}",
            "ignore_startup_parameters = extra_float_digits",
            "log_connections = 0",
            "log_disconnections = 0",
            "",
        ]
    )


@contextlib.contextmanager
def pgbouncer(
    server: str, *, pool_size: int = POOL_SIZE, round_robin: bool = True
) -> Iterator[PgBouncer]:
    """Start pgbouncer (transaction mode) in front of ``server``; raises RuntimeError with
    the reason when it cannot run. The defaults are the hostile test setup; the
    benchmark uses a production-like one (a larger pool, LIFO reuse)."""
    binary = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )
    if binary is None:
        raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
    user = conninfo_to_dict(server).get("user") or "postgres"
    workdir = Path(tempfile.mkdtemp(prefix="pgflow-pgbouncer-"))
    command = [binary]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root: drop to the postgres user
        try:
            run_as = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("pgbouncer refuses root and there is no postgres user") from None
        os.chown(workdir, run_as.pw_uid, run_as.pw_gid)
        command += ["-u", "postgres"]
    (workdir / "userlist.txt").write_text(f'{_quote(str(user))} ""\n')
    try:
        for _attempt in range(5):  # the free port may be taken before pgbouncer binds it
            port = _free_port()
            ini = workdir / "pgbouncer.ini"
            ini.write_text(_config(server, port, workdir, pool_size, round_robin))
            proc = subprocess.Popen(
                [*command, str(ini)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            bouncer = PgBouncer(proc, port, workdir)
            if _wait_ready(bouncer, server):
                break
            _stop(proc)
        else:
            raise RuntimeError(f"pgbouncer did not start: {bouncer.log[-500:]}")
        try:
            yield bouncer
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(bouncer: PgBouncer, server: str) -> bool:
    deadline = time.monotonic() + 10
    dsn = bouncer.dsn_for(server)
    while time.monotonic() < deadline:
        if bouncer.proc.poll() is not None:
            return False
        try:
            with psycopg.connect(dsn, connect_timeout=2, prepare_threshold=None) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()
