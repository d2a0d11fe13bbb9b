"""``pgflow graph module:attr``: print a workflow's graph as a mermaid state diagram."""

from __future__ import annotations

import argparse
from typing import Any

from ..builder import Builder
from ._worker import load_target, resolve_workflow


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "graph",
        help="print a workflow's graph (mermaid)",
        description=(
            "Print the graph of MODULE:ATTR (a pgflow.Builder, a pgflow.Workflow, or a "
            "zero-argument factory of one) as a mermaid stateDiagram-v2. Needs no database."
        ),
    )
    parser.add_argument("target", metavar="MODULE:ATTR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    target = resolve_workflow(load_target(args.target), None)
    graph = target.graph() if isinstance(target, Builder) else target.graph
    print(graph.mermaid(), end="")
    return 0
