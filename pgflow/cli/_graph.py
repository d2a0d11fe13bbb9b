"""``pgflow graph module:attr``: print a workflow's graph as a mermaid state diagram."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pgflow.cli._common import add_command, load_target, resolve_workflow
from pgflow.errors import ConfigError
from pgflow.workflow.builder import Builder
from pgflow.workflow.graph import DIRECTIONS


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "graph",
        "print a workflow's graph (mermaid)",
        "Print the graph of MODULE:ATTR (a pgflow.Builder, a pgflow.Workflow, or a "
        "zero-argument factory of one) as a mermaid stateDiagram-v2. Needs no database.",
        dsn=False,
    )
    parser.add_argument("target", metavar="MODULE:ATTR")
    parser.add_argument(
        "--direction",
        type=str.upper,
        choices=DIRECTIONS,
        help="layout: TB (top to bottom, default), BT, LR (left to right) or RL",
    )
    parser.add_argument(
        "--output", "-o", metavar="FILE", help="write the diagram to FILE instead of stdout"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    target = resolve_workflow(load_target(args.target), None)
    graph = target.graph() if isinstance(target, Builder) else target.graph
    text = graph.mermaid(args.direction)
    if args.output:
        try:
            Path(args.output).write_text(text)
        except OSError as exc:
            raise ConfigError(f"--output {args.output}: {exc.strerror or exc}") from None
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0
