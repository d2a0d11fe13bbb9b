"""Builder validation and ``pgflow graph``."""

from __future__ import annotations

import enum
import subprocess
import sys
from pathlib import Path

import pytest

import pgflow


class S(enum.IntEnum):
    A = 1
    B = 2
    C = 3


class Other(enum.IntEnum):
    X = 1


def noop(run: object) -> None:
    return None


def builder() -> pgflow.Builder[dict[str, object], S]:
    return pgflow.Builder("v", dict, S)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda b: b.add_step(Other.X, noop, S.B), "unknown status <Other.X: 1>"),
        (lambda b: b.add_step(S.A, noop, Other.X), "destination: unknown status"),
        (lambda b: b.add_step(S.A, noop), "declares no destination"),
        (lambda b: b.add_step(S.A, noop, S.B).add_step(S.A, noop, S.C), "duplicate consumer"),
        (lambda b: b.add_step(S.A, noop, S.B, parallel_count=0), "parallel_count must be positive"),
        (lambda b: b.add_step(S.A, noop, S.B, batch_size=-1), "batch_size must be positive"),
        (lambda b: b.add_step(S.A, noop, S.B, err_backoff=0), "err_backoff must be positive"),
        (lambda b: b.add_step(S.A, noop, S.B, consume_lag=-1), "consume_lag must be zero or more"),
        (lambda b: b.add_step(S.A, noop, S.B, polling_frequency="x"), "polling_frequency"),
        (lambda b: b.add_step(S.A, noop, S.B, bogus=1), "unknown option 'bogus'"),
        (lambda b: b.add_step(S.A, 42, S.B), "is not callable"),
        (
            # several timeouts per status are fine (luno), but they share one armer
            lambda b: b.add_timeout(S.A, noop, noop, S.B).add_timeout(
                S.A, noop, noop, S.C, parallel_count=2
            ),
            "timeouts on one status must share parallel_count",
        ),
        (lambda b: b.add_step(S.A, noop, S.B).add_connector("c", object(), noop), "has no make"),
        (lambda b: b, "nothing to run"),
    ],
)
def test_build_errors_name_the_problem(setup, message) -> None:  # type: ignore[no-untyped-def]
    b = builder()
    setup(b)
    with pytest.raises(pgflow.BuildError, match=message.replace("(", r"\(").replace(")", r"\)")):
        b.build("postgresql://localhost/x")


def test_duplicate_connectors_and_all_problems_at_once() -> None:
    class Conn:
        async def make(self, name: str) -> object:
            return object()

    b = builder()
    b.add_step(S.A, noop, S.B, parallel_count=0)
    b.add_connector("c", Conn(), noop)
    b.add_connector("c", Conn(), noop, max_retries=0)
    with pytest.raises(pgflow.BuildError) as err:
        b.build("postgresql://localhost/x")
    text = str(err.value)
    assert "parallel_count must be positive" in text
    assert "two connectors named 'c'" in text


def test_status_enum_must_be_an_enum() -> None:
    with pytest.raises(pgflow.BuildError, match="status_enum"):
        pgflow.Builder("v", dict, int).build("postgresql://localhost/x")  # type: ignore[type-var]


def test_valid_graph_terminal_statuses_and_mermaid() -> None:
    b = builder()
    b.add_step(S.A, noop, S.B, S.C, parallel_count=3)
    b.add_callback(S.B, noop, S.C)
    wf = b.build("postgresql://localhost/x")
    g = wf.graph
    assert g.start is S.A
    assert g.is_terminal(S.C) and not g.is_terminal(S.B)
    assert g.destinations(S.A) == {S.B, S.C}
    text = wf.mermaid()
    assert text.startswith("stateDiagram-v2")
    assert "A --> B: noop" in text and "B --> C: callback noop" in text
    assert "C --> [*]" in text and "[*] --> A" in text


def test_pgflow_graph_cli() -> None:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [str(Path(sys.executable).parent / "pgflow"), "graph", "tests.workflow_app:builder"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "stateDiagram-v2" in out.stdout
    assert "CREATED --> CHARGED: charge" in out.stdout
    bad = subprocess.run(
        [str(Path(sys.executable).parent / "pgflow"), "graph", "tests.workflow_app:nope"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert "nope" in bad.stderr


def test_pgflow_graph_direction_and_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgflow.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    out = tmp_path / "orders.mmd"
    assert main(["graph", "tests.workflow_app:builder", "--direction", "lr", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    text = out.read_text()
    assert text.splitlines()[:2] == ["stateDiagram-v2", "    direction LR"]
    assert "CREATED --> CHARGED: charge" in text
    assert main(["graph", "tests.workflow_app:builder"]) == 0
    assert "direction" not in capsys.readouterr().out  # default: mermaid's own (TB)
    assert main(["graph", "tests.workflow_app:builder", "-o", str(tmp_path / "no/such/x")]) == 1
    assert "--output" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["graph", "tests.workflow_app:builder", "--direction", "up"])
    with pytest.raises(ValueError, match="direction must be one of TB, BT, LR, RL"):
        __import__("tests.workflow_app").workflow_app.builder.graph().mermaid("up")
