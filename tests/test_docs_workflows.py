"""docs/workflows.md: every python and sh block runs, in order, against a real database.

The python blocks share one namespace (like a notebook); the sh blocks run in bash with
the venv's ``pgflow`` on PATH. A failing block fails the test, naming its line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "workflows.md"
BLOCK = re.compile(r"^```(python|sh)\n(.*?)^```$", re.S | re.M)


def blocks() -> list[tuple[str, int, str]]:
    text = DOC.read_text()
    return [(m[1], text[: m.start()].count("\n") + 1, m[2]) for m in BLOCK.finditer(text)]


def test_the_guide_has_its_sections() -> None:
    found = blocks()
    assert sum(kind == "python" for kind, _, _ in found) >= 12
    assert sum(kind == "sh" for kind, _, _ in found) >= 1
    text = DOC.read_text()
    for heading in (
        "## Steps and their options",
        "## Callbacks",
        "## Timeouts",
        "## Schedules",
        "## Hooks",
        "## Run states",
        "## Listing runs",
        "## Erasing personal data",
        "## Chaining workflows",
        "## Testing",
        "## Coming from luno/workflow",
    ):
        assert heading in text


def test_every_snippet_runs(pgflow_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGFLOW_DATABASE_URL", pgflow_dsn)
    monkeypatch.chdir(ROOT)
    module = types.ModuleType("workflows_md")  # dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace: dict[str, Any] = module.__dict__
    env = {
        **os.environ,
        "PGFLOW_DATABASE_URL": pgflow_dsn,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
    }
    for kind, line, code in blocks():
        where = f"docs/workflows.md:{line}"
        if kind == "python":
            try:
                exec(compile(code, where, "exec"), namespace)
            except BaseException as exc:
                raise AssertionError(f"{where}: {type(exc).__name__}: {exc}") from exc
        else:
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", code],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, f"{where}: {done.stdout}\n{done.stderr}"
            assert "parcel-3" in done.stdout and "stateDiagram-v2" in done.stdout
            assert "cannot pause" in done.stderr
