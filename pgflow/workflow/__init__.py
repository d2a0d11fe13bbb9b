"""The workflow engine: records (one row per run), steps, timers, hooks, and the
workflow's side of connectors. Built on :mod:`pgflow.log` and :mod:`pgflow.connectors`.

Start at :mod:`pgflow.workflow.builder` (how a workflow is declared) and
:mod:`pgflow.workflow.workflow` (what runs it); :mod:`pgflow.workflow.records` owns every
write to ``pgflow.records``.
"""

from pgflow.workflow.workflow import ConsumerState, Workflow

__all__ = ["ConsumerState", "Workflow"]
