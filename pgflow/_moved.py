"""Old import paths of modules that moved into the layered packages (pgflow 0.2).

``import pgflow.admin`` or ``from pgflow.streamer import Filter`` keep working: a
meta-path finder answers for the old name with the module at its new home (the very
same module object, so ``isinstance`` and monkeypatching see one thing) and emits a
``DeprecationWarning`` naming the new path. A finder rather than one shim file per old
name keeps the package's folder listing the architecture map it is meant to be.

``pgflow.capture`` is special: it is also the :func:`~pgflow.connectors.capture.capture`
function exported by ``pgflow``. Importing a submodule sets it as an attribute of its
parent, which would replace the function with the module; that alias is therefore
registered up front (so the import system finds it in ``sys.modules`` and sets
nothing), without a warning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "pgflow.events": "pgflow.log.events",
    "pgflow.snapshots": "pgflow.log.snapshots",
    "pgflow.streamer": "pgflow.log.streamer",
    "pgflow.cursors": "pgflow.log.cursors",
    "pgflow.builder": "pgflow.workflow.builder",
    "pgflow.api": "pgflow.workflow.api",
    "pgflow.run": "pgflow.workflow.run",
    "pgflow.records": "pgflow.workflow.records",
    "pgflow.graph": "pgflow.workflow.graph",
    "pgflow.admin": "pgflow.workflow.actions",
    "pgflow.chain": "pgflow.workflow.chain",
    "pgflow.clock": "pgflow.workflow.clock",
    "pgflow.listing": "pgflow.workflow.listing",
    "pgflow.timers": "pgflow.workflow.timers",
    "pgflow.capture": "pgflow.connectors.capture",
    "pgflow.migrations": "pgflow.ops.migrations",
    "pgflow.retention": "pgflow.ops.retention",
    "pgflow.inspect": "pgflow.ops.inspect",
    "pgflow.demo": "pgflow.demos.orders",
}
"""Old module name -> where it lives now."""

_REGISTERED_UP_FRONT = ("pgflow.capture",)


class _MovedLoader(importlib.abc.Loader):
    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new_name}; the old name will be removed in pgflow 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(self.new_name)
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system stamped the alias spec on the real module; give it back.
        module.__spec__ = self._real_spec


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        new_name = MOVED.get(fullname)
        if new_name is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedLoader(new_name))


def install() -> None:
    """Answer for the old names (idempotent; called by ``pgflow/__init__``)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
    for old in _REGISTERED_UP_FRONT:
        sys.modules.setdefault(old, importlib.import_module(MOVED[old]))
