"""`pgflow runs|lag|show|stuck|retry|pause|resume|cancel|dead-letters` and the renderer."""

from __future__ import annotations

import enum
import json
import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg
import pytest

import pgflow
from pgflow.cli import main
from pgflow.cli._render import format_interval, render_csv, render_json, render_record, render_table
from pgflow.testing import run_sync
from tests.test_views import build_scenario


# ------------------------------------------------------------------ renderer
def test_table_alignment_and_readable_values() -> None:
    when = datetime(2024, 5, 1, 12, 3, 4, tzinfo=UTC)
    text = render_table(
        ["name", "n", "ok", "idle", "at", "obj", "note"],
        [
            ("a", 5, True, timedelta(minutes=2, seconds=5), when, {"k": [1, 2]}, None),
            ("longer", 12345, False, timedelta(hours=3, minutes=7), when, None, "x\ny"),
        ],
    )
    lines = text.splitlines()
    assert lines[0].split() == ["name", "n", "ok", "idle", "at", "obj", "note"]
    assert lines[2].split()[:4] == ["a", "5", "yes", "2m"]
    assert "3h 07m" in lines[3] and "x y" in lines[3]
    assert '{"k":[1,2]}' in lines[2]
    assert "2024-05-01 12:03:04+00:00" in lines[2]
    # numbers are right-aligned: the last digit lines up
    assert lines[2].index("5 ") == lines[3].index("12345") + 4
    assert lines[-1] == "(2 rows)"


def test_long_cells_are_cut_and_interval_formats() -> None:
    text = render_table(["x"], [("y" * 100,)], max_width=10)
    assert text.splitlines()[2] == "y" * 9 + "…"
    assert [format_interval(s) for s in (0.25, 4.2, 125, 3 * 3600 + 420, 2 * 86400 + 4 * 3600)] == [
        "250ms", "4.2s", "2m 05s", "3h 07m", "2d 4h",
    ]  # fmt: skip
    assert render_record([("status", "PAID"), ("err_count", 0)]) == "status     PAID\nerr_count  0"


def test_json_and_csv_keep_full_values() -> None:
    rid = UUID(int=7)
    when = datetime(2024, 5, 1, tzinfo=UTC)
    rows = [(rid, when, timedelta(seconds=90), Decimal("1.5"), {"a": None}, True, "z" * 100)]
    cols = ["run_id", "at", "idle", "n", "obj", "ok", "long"]
    data = json.loads(render_json(cols, rows))
    assert data == [
        {
            "run_id": str(rid),
            "at": "2024-05-01T00:00:00+00:00",
            "idle": 90.0,
            "n": 1.5,
            "obj": {"a": None},
            "ok": True,
            "long": "z" * 100,
        }
    ]
    lines = render_csv(cols, rows).splitlines()
    assert lines[0] == "run_id,at,idle,n,obj,ok,long"
    assert lines[1] == f'{rid},2024-05-01T00:00:00+00:00,90.0,1.5,"{{""a"":null}}",true,{"z" * 100}'


# ------------------------------------------------------------------ commands
@pytest.fixture
def dsn(pgflow_dsn: str) -> str:
    async def setup() -> None:
        async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
            await build_scenario(conn)

    run_sync(setup())
    return pgflow_dsn


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return list(conn.execute(sql, params or None).fetchall())


def test_runs_filters(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "runs", "--dsn", dsn)
    lines = out.splitlines()
    assert code == 0 and lines[-1] == "(7 rows)"
    assert lines[0].split() == [
        "workflow", "foreign_id", "run_id", "status", "run_state", "err_count", "idle_for",
        "updated_at", "last_error", "run_state_reason",
    ]  # fmt: skip
    # most recently moved first; the runs idle for an hour last
    assert {line.split()[1] for line in lines[-4:-1]} == {"order-4", "order-5", "order-6"}
    # run ids shortened to 8 characters in tables
    assert all(len(line.split()[2]) == 8 for line in lines[2:-1])

    _, out, _ = cli(capsys, "runs", "--dsn", dsn, "--state", "paused")
    assert [line.split()[1] for line in out.splitlines()[2:-1]] == ["order-3"]
    _, out, _ = cli(capsys, "runs", "--dsn", dsn, "--workflow", "refunds", "--json")
    data = json.loads(out)
    assert [(d["foreign_id"], d["status"]) for d in data] == [("order-1", "REQUESTED")]
    assert len(data[0]["run_id"]) == 36 and data[0]["object"] == {"amount": 10}
    _, out, _ = cli(capsys, "runs", "--dsn", dsn, "--status", "CREATED", "--active", "--csv")
    assert len(out.splitlines()) == 1 + 4
    _, out, _ = cli(capsys, "runs", "--dsn", dsn, "--limit", "2")
    assert out.splitlines()[-1] == "(2 rows) (more rows exist: raise --limit)"


def test_show_record_and_history(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "show", "order-1", "--dsn", dsn, "--workflow", "orders")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("== orders / order-1 / run ")
    header = next(i for i, line in enumerate(lines) if line.startswith("step"))
    record = dict(line.split(None, 1) for line in lines[1 : header - 1])
    assert record["status"] == "SHIPPED" and record["run_state"] == "COMPLETED"
    assert "last_error" not in record  # empty fields are left out
    steps = [line.split() for line in lines[header + 2 :]]
    assert [(s[0], s[-5], s[-4], s[-3], s[-2]) for s in steps] == [
        ("1", "CREATED", "trigger", "INITIATED", "1"),
        ("2", "PAID", "step", "RUNNING", "2"),
        ("3", "SHIPPED", "step", "COMPLETED", "3"),
    ]
    assert steps[1][-6] == "CREATED" and steps[2][-6] == "PAID"  # from_status

    # Without --workflow: the latest run in each workflow.
    _, out, _ = cli(capsys, "show", "order-1", "--dsn", dsn, "--json")
    data = json.loads(out)
    assert sorted(d["record"]["workflow"] for d in data) == ["orders", "refunds"]
    orders = next(d for d in data if d["record"]["workflow"] == "orders")
    assert [h["status"] for h in orders["history"]] == ["CREATED", "PAID", "SHIPPED"]

    code, _, err = cli(capsys, "show", "nope", "--dsn", dsn)
    assert code == 1 and err.strip() == "pgflow: error: no run for foreign id 'nope'"


def test_lag_table_and_horizon_line(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    query(
        dsn,
        "INSERT INTO pgflow.cursors (consumer, shard, shard_count, stream, types)"
        " VALUES ('orders/CREATED', 0, 1, 'orders', '{CREATED}'),"
        " ('orders/PAID', 1, 2, 'orders', '{PAID}') RETURNING 1",
    )
    code, out, _ = cli(capsys, "lag", "--dsn", dsn)
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == [
        "consumer", "shard", "stream", "lag_events", "lag", "oldest_pending", "cursor_moved",
    ]  # fmt: skip
    created = next(line for line in lines if line.startswith("orders/CREATED"))
    assert created.split()[1:4] == ["-", "orders", "6"]  # CREATED events of order-1..6
    assert any(line.startswith("orders/PAID") and " 1/2 " in line for line in lines)
    assert lines[-1].startswith("oldest open transaction: ")
    _, out, _ = cli(capsys, "lag", "--dsn", dsn, "--json")
    data = json.loads(out)
    assert {c["consumer"] for c in data["consumers"]} == {"orders/CREATED", "orders/PAID"}
    assert "age_seconds" in data["horizon"]


def test_stuck(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = cli(capsys, "stuck", "--dsn", dsn, "--json")
    assert {d["foreign_id"]: d["reason"] for d in json.loads(out)} == {
        "order-2": "erroring",
        "order-3": "paused",
        "order-4": "idle",
        "order-6": "timer overdue",
    }
    _, out, _ = cli(capsys, "stuck", "--dsn", dsn, "--after", "3 hours", "--json")
    assert {d["foreign_id"] for d in json.loads(out)} == {"order-2", "order-3"}
    code, _, err = cli(capsys, "stuck", "--dsn", dsn, "--after", "soon")
    assert code == 1 and "--after 'soon'" in err


def test_pause_resume_cancel_retry(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    def state(fid: str) -> tuple[Any, ...]:
        return query(
            dsn,
            "SELECT status, run_state, err_count FROM pgflow.records"
            " WHERE workflow = 'orders' AND foreign_id = %s",
            fid,
        )[0]

    # order-1 has runs in two workflows: ambiguous without --workflow.
    code, _, err = cli(capsys, "pause", "order-1", "--dsn", dsn)
    assert code == 1 and "several workflows (orders, refunds): pass --workflow" in err

    code, out, _ = cli(capsys, "retry", "order-2", "--dsn", dsn)
    assert code == 0 and out.startswith("retry: orders / order-2 / run ")
    assert state("order-2") == ("CREATED", "INITIATED", 0)

    assert cli(capsys, "pause", "order-4", "--dsn", dsn)[0] == 0
    assert state("order-4")[1] == "PAUSED"
    assert cli(capsys, "resume", "order-4", "--dsn", dsn)[0] == 0
    assert state("order-4")[1] == "RUNNING"

    (run_id,) = query(dsn, "SELECT run_id::text FROM pgflow.records WHERE foreign_id = 'order-5'")[
        0
    ]
    code, out, _ = cli(capsys, "cancel", "order-5", "--dsn", dsn, "--run-id", run_id[:6])
    assert code == 0 and "CANCELLED" in out
    assert state("order-5")[1] == "CANCELLED"

    code, _, err = cli(capsys, "resume", "order-1", "--workflow", "orders", "--dsn", dsn)
    assert code == 1 and "cannot resume" in err and "COMPLETED" in err
    code, _, err = cli(capsys, "cancel", "order-5", "--dsn", dsn, "--run-id", "ffffffff")
    assert code == 1 and "no run ffffffff" in err

    history = query(
        dsn,
        "SELECT change FROM pgflow.run_history WHERE foreign_id = 'order-4' ORDER BY step",
    )
    assert [h[0] for h in history] == ["trigger", "pause", "resume"]


def test_dead_letters_list_and_replay(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    query(
        dsn,
        "INSERT INTO pgflow.dead_letters (consumer, event_id, foreign_id, type, reason, payload)"
        " VALUES ('payments', 'm-1', 'pay-1', 'paid', 'bad json', '\"{oops\"'),"
        " ('orders/CREATED', '17', 'order-2', 'CREATED', 'step kept failing', NULL)"
        " RETURNING id",
    )
    code, out, _ = cli(capsys, "dead-letters", "--dsn", dsn)
    lines = out.splitlines()
    assert code == 0 and lines[-1] == "(2 rows)"
    assert lines[0].split()[:4] == ["id", "consumer", "foreign_id", "type"]
    ids = [int(line.split()[0]) for line in lines[2:-1]]

    # A connector's dead letter: re-appended to the log, marked replayed.
    code, out, _ = cli(capsys, "dead-letters", "--dsn", dsn, "--replay", str(ids[0]))
    assert code == 0 and "appended event" in out
    (event,) = query(
        dsn,
        "SELECT stream, type, foreign_id, headers FROM pgflow.events"
        " WHERE stream = 'pgflow.replay'",
    )
    assert event[:3] == ("pgflow.replay", "paid", "pay-1")
    assert event[3]["replay_of"] == str(ids[0]) and event[3]["payload"] == '"{oops"'

    # A workflow step's dead letter: the run is retried through pgflow.admin.
    query(dsn, "UPDATE pgflow.records SET err_count = 5 WHERE foreign_id = 'order-2' RETURNING 1")
    code, out, _ = cli(capsys, "dead-letters", "--dsn", dsn, "--replay", str(ids[1]))
    assert code == 0 and "retried orders / order-2" in out
    assert query(dsn, "SELECT err_count FROM pgflow.records WHERE foreign_id = 'order-2'") == [(0,)]

    code, _, err = cli(capsys, "dead-letters", "--dsn", dsn, "--replay", str(ids[1]))
    assert code == 1 and "already replayed" in err
    _, out, _ = cli(capsys, "dead-letters", "--dsn", dsn)
    assert out.splitlines()[-1] == "(0 rows)"
    _, out, _ = cli(capsys, "dead-letters", "--dsn", dsn, "--all", "--json")
    assert {d["state"] for d in json.loads(out)} == {"replayed"}


def test_unmigrated_database_says_so(
    pgflow_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"pgflow_cli_empty_{os.getpid()}"
    with psycopg.connect(pgflow_server.server, autocommit=True) as admin_conn:
        admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin_conn.execute(f'CREATE DATABASE "{name}"')
    try:
        code, _, err = cli(capsys, "runs", "--dsn", pgflow_server.dsn_for(name))
        assert code == 1 and "run `pgflow migrate`" in err
    finally:
        pgflow_server.drop(pgflow_server.dsn_for(name))


# -- replay through a connector function (--target) -----------------------------------
class PayStatus(enum.IntEnum):
    RECEIVED = 1
    BOOKED = 2


async def on_payment(api: Any, event: Any) -> None:
    if event.headers.get("poison") == "yes":
        raise RuntimeError("still broken")
    await api.trigger(f"pay-{event.foreign_id}", initial={"event": event.id})


def payments_builder() -> pgflow.Builder[dict[str, Any], PayStatus]:
    """`--target tests.test_cli_tables:payments_builder` (built with the CLI's --dsn)."""
    from pgflow.connectors.memory import Connector

    async def book(run: pgflow.Run[dict[str, Any], PayStatus]) -> PayStatus:
        return PayStatus.BOOKED

    b = pgflow.Builder("payments", dict, PayStatus)
    b.add_step(PayStatus.RECEIVED, book, PayStatus.BOOKED)
    b.add_connector("bank", Connector([]), on_payment)
    return b


def test_dead_letter_replay_through_the_connector_function(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (ok_id,), (poison_id,), (malformed_id,) = query(
        dsn,
        "INSERT INTO pgflow.dead_letters (consumer, event_id, foreign_id, type, headers, reason)"
        # what the runner stores ("<workflow>--<connector>"); a full consumer name too
        " VALUES ('payments--bank', 'e-1', 'o-7', 'paid', '{}', 'db was down'),"
        " ('payments--bank-1-of-1', 'e-2', 'o-8', 'paid', '{\"poison\": \"yes\"}', 'boom'),"
        " ('payments--bank-1-of-1', 'e-3', NULL, NULL, '{}', 'not json')"
        " RETURNING id",
    )
    target = "tests.test_cli_tables:payments_builder"
    code, out, err = cli(
        capsys, "dead-letters", "--dsn", dsn, "--replay", str(ok_id), "--target", target
    )
    assert code == 0, err
    assert "connector bank of payments handled event e-1 for 'o-7'" in out
    assert query(dsn, "SELECT status, object FROM pgflow.records WHERE foreign_id = 'pay-o-7'") == [
        ("RECEIVED", {"event": "e-1"})
    ]

    # A replay that fails again changes nothing: the dead letter stays pending.
    code, _, err = cli(
        capsys, "dead-letters", "--dsn", dsn, "--replay", str(poison_id), "--target", target
    )
    assert code == 1 and "RuntimeError: still broken" in err and "stays pending" in err
    assert query(dsn, "SELECT replayed_at FROM pgflow.dead_letters WHERE id = %s", poison_id) == [
        (None,)
    ]
    code, _, err = cli(
        capsys, "dead-letters", "--dsn", dsn, "--replay", str(malformed_id), "--target", target
    )
    assert code == 1 and "malformed message" in err
    code, _, err = cli(
        capsys, "dead-letters", "--dsn", dsn, "--replay", str(ok_id), "--target", target
    )
    assert code == 1 and "already replayed" in err
    # Another workflow's connector of the same name is not this one.
    ((other_id,),) = query(
        dsn,
        "INSERT INTO pgflow.dead_letters (consumer, event_id, foreign_id, type, headers, reason)"
        " VALUES ('refunds--bank', 'e-1', 'o-7', 'paid', '{}', 'db was down') RETURNING id",
    )
    code, _, err = cli(
        capsys, "dead-letters", "--dsn", dsn, "--replay", str(other_id), "--target", target
    )
    assert code == 1 and "belongs to 'refunds'" in err
