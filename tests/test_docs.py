"""Every code snippet in the docs runs: docs/*.md and the top-level *.md files.

A page that shows code nobody ran drifts from the code (renamed arguments, moved
modules) and readers find out first. So each markdown file is run top to bottom, in
a scratch directory, against a fresh migrated database (``PGFLOW_DATABASE_URL``):

* ``python`` blocks are executed in one namespace per file, like a notebook: a later
  block may use what an earlier one defined;
* ``sh``/``bash``/``shell`` blocks run in ``bash -euo pipefail`` with the checkout's
  ``pgflow`` command on PATH and the scratch directory as working directory;
* ``sql`` blocks run in one transaction, rolled back;
* other kinds (``text``, ``json``, untagged output samples) are left alone.

A block that must not (or cannot) run that way says so in an HTML comment right above
it (invisible when rendered)::

    <!-- not run: REASON -->         skipped; the reason is required
    <!-- file: flow.py -->            written to the scratch directory, not run itself
                                      (later blocks and scripts import it)
    <!-- script: quickstart.py -->   written there and run as ``python quickstart.py``
    <!-- needs: nats -->             runs only when that service answers (nats,
                                      rabbitmq, redis, kafka); otherwise the file's test
                                      ends skipped, naming what it could not run

An unmarked block that fails fails the test, naming ``file:line``; so does a marker
this test does not know, and so does importing a module by a name it moved away from
(``pgflow._moved``: a DeprecationWarning elsewhere, an error here). New markdown files
are picked up automatically.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import textwrap
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgflow._moved import MOVED
from tests._brokers import TANSU, tansu, up

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")])
RUNNABLE = {"python": "python", "sh": "sh", "bash": "sh", "shell": "sh", "sql": "sql"}
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$",
    re.S | re.M,
)
DIRECTIVE = re.compile(r"^\s*<!--\s*(?P<key>[\w -]+?)\s*:\s*(?P<value>.*?)\s*-->\s*$")
KEYS = {"not run", "file", "script", "needs"}

#: What the shell blocks of a page must print (stdout and stderr together), beyond
#: exiting 0: the commands are about the runs the page's python made.
EXPECTED_OUTPUT = {
    "docs/workflows.md": ["parcel-3", "stateDiagram-v2", "cannot pause"],
}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    kind: str  #: "python", "sh" or "sql"
    code: str
    directives: dict[str, str]

    @property
    def where(self) -> str:
        return f"{_rel(self.path)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The runnable blocks of ``path``, with the directives written right above each."""
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for m in FENCE.finditer(text):
        kind = RUNNABLE.get(m["lang"])
        if kind is None:
            continue
        line = text[: m.start()].count("\n") + 1
        directives: dict[str, str] = {}
        above = line - 2  # index of the line above the fence
        while above >= 0 and not lines[above].strip():
            above -= 1
        while above >= 0 and (d := DIRECTIVE.match(lines[above])):
            directives[d["key"]] = d["value"]
            above -= 1
        code = textwrap.dedent(m["code"]) if m["indent"] else m["code"]
        found.append(Block(path, line, kind, code, directives))
    return found


def _problems(block: Block) -> list[str]:
    unknown = set(block.directives) - KEYS
    problems = [f"{block.where}: unknown directive(s) {sorted(unknown)}"] if unknown else []
    if "not run" in block.directives and not block.directives["not run"]:
        problems.append(f"{block.where}: 'not run' needs a reason")
    if "needs" in block.directives and block.directives["needs"] not in SERVICES:
        problems.append(f"{block.where}: needs an unknown service {block.directives['needs']}")
    return problems


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def test_the_docs_are_found_and_their_markers_known() -> None:
    assert {"README.md", "docs/workflows.md", "docs/connectors.md"} <= {_rel(p) for p in DOCS}
    problems = [p for doc in DOCS for b in blocks(doc) for p in _problems(b)]
    assert not problems, "\n".join(problems)


def test_the_parser_sees_markers_and_indented_fences(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 1\n```\n\n<!-- not run: why -->\n\n```sh\nfalse\n```\n"
        "- item\n\n  ```bash\n  echo hi\n  ```\n<!-- file: a.py -->\n```python\ny = 2\n```\n"
        "```text\nignored\n```\n"
    )
    found = [(b.kind, b.code, b.directives) for b in blocks(page)]
    assert found == [
        ("python", "x = 1\n", {}),
        ("sh", "false\n", {"not run": "why"}),
        ("sh", "echo hi\n", {}),
        ("python", "y = 2\n", {"file": "a.py"}),
    ]


def test_the_workflow_guide_has_its_sections() -> None:
    doc = ROOT / "docs" / "workflows.md"
    found = blocks(doc)
    assert sum(b.kind == "python" and not b.directives for b in found) >= 12
    assert sum(b.kind == "sh" and not b.directives for b in found) >= 1
    text = doc.read_text()
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


# -- services the broker snippets need -------------------------------------------------


def _forget_nats_stream() -> None:
    """JetStream drops a re-published message id for two minutes (its duplicate window),
    and the snippet publishes fixed ids: start from no stream, as a reader would."""
    import asyncio

    import nats

    async def delete() -> None:
        nc = await nats.connect("nats://127.0.0.1:4222")
        try:
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream("SHOP")
        finally:
            await nc.close()

    asyncio.run(delete())


@contextlib.contextmanager
def _kafka() -> Iterator[bool]:
    """A Kafka-protocol broker on 9092 for the Kafka snippet: the one running there, or
    Tansu (the test extra's broker, in-memory) started for the page, as the page says."""
    if up(9092):
        yield True
    elif TANSU is None:
        yield False
    else:
        with tansu(9092) as started:
            yield started


@dataclass(frozen=True)
class Service:
    port: int
    prepare: Callable[[], None] | None = None


SERVICES = {
    "nats": Service(4222, _forget_nats_stream),
    "rabbitmq": Service(5672),
    "redis": Service(6379),
    "kafka": Service(9092),
}


# -- running a page ----------------------------------------------------------------------


def _params() -> list[Any]:
    # Pages driving brokers and several processes take tens of seconds.
    slow = {"docs/connectors.md"}
    return [
        pytest.param(doc, id=_rel(doc), marks=[pytest.mark.slow] if _rel(doc) in slow else [])
        for doc in DOCS
    ]


@pytest.mark.parametrize("doc", _params())
def test_every_snippet_runs(
    doc: Path, pgflow_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runnable = [b for b in blocks(doc) if "not run" not in b.directives]
    if not runnable:
        pytest.skip(f"{_rel(doc)} has no runnable snippet")
    monkeypatch.setenv("PGFLOW_DATABASE_URL", pgflow_dsn)
    for old in MOVED:  # cached old names would import without a warning
        monkeypatch.delitem(sys.modules, old, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = types.ModuleType("doc_" + re.sub(r"\W", "_", doc.stem))  # dataclasses look it up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace: dict[str, Any] = module.__dict__
    env = {
        **os.environ,
        "PGFLOW_DATABASE_URL": pgflow_dsn,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
        "HOOK_SECRET": "s3cret",  # docs/connectors.md's webhook_app.py reads its secret here
        "PYTHONWARNINGS": ",".join(f"error:{old} moved to:DeprecationWarning" for old in MOVED),
    }
    shell_output: list[str] = []
    missing: list[str] = []
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.filterwarnings("error", r"pgflow\.\S+ moved to ", DeprecationWarning)
        kafka: bool | None = None
        for block in runnable:
            needs = block.directives.get("needs")
            if needs is not None:
                if needs == "kafka" and kafka is None:
                    kafka = stack.enter_context(_kafka())
                service = SERVICES[needs]
                if not up(service.port):
                    missing.append(f"{block.where} (needs {needs})")
                    continue
                if service.prepare is not None:
                    service.prepare()
            _run(block, namespace, env, tmp_path, pgflow_dsn, shell_output)
    for expected in EXPECTED_OUTPUT.get(_rel(doc), []):
        assert expected in "".join(shell_output), f"{_rel(doc)}: no {expected!r} in the output"
    if missing:
        pytest.skip(f"ran {len(runnable) - len(missing)} blocks; not: {', '.join(missing)}")


def _run(
    block: Block,
    namespace: dict[str, Any],
    env: dict[str, str],
    scratch: Path,
    dsn: str,
    shell_output: list[str],
) -> None:
    directives = block.directives
    name = directives.get("file") or directives.get("script")
    if name is not None:
        (scratch / name).write_text(block.code)
        sys.modules.pop(Path(name).stem, None)  # a rewritten module is imported afresh
        if "file" in directives:
            return
        argv = [sys.executable, name]
    elif block.kind == "python":
        try:
            exec(compile(block.code, block.where, "exec"), namespace)
        except BaseException as exc:
            raise AssertionError(f"{block.where}: {type(exc).__name__}: {exc}") from exc
        return
    elif block.kind == "sql":
        with psycopg.connect(dsn) as conn:
            try:
                conn.execute(block.code.encode())  # bytes: no placeholders, no parsing
            except psycopg.Error as exc:
                raise AssertionError(f"{block.where}: {exc}") from exc
            finally:
                conn.rollback()
        return
    else:
        argv = ["bash", "-euo", "pipefail", "-c", block.code]
    done = subprocess.run(
        argv, env=env, cwd=scratch, capture_output=True, text=True, timeout=90, check=False
    )
    output = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"{block.where}: exit {done.returncode}\n{output}"
    if block.kind == "sh":
        shell_output += [done.stdout, done.stderr]
