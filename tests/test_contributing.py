"""CONTRIBUTING.md's architecture map must name every module of pgflow/, and only
modules that exist: a map that drifts from the folder listing is worse than none."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pgflow"
#: Packages the map describes as a whole (one row), not module by module.
DESCRIBED_WHOLE = {"cli", "ui", "observability", "testing"}


def _map_text() -> str:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    return text[: text.index("## 2.")]


def test_the_map_names_every_module() -> None:
    text = _map_text()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in DESCRIBED_WHOLE and len(rel.parts) > 1:
            if f"pgflow/{rel.parts[0]}/" not in text:
                missing.append(f"pgflow/{rel.parts[0]}/")
            continue
        if rel.name == "__init__.py" and len(rel.parts) > 1:
            continue  # a package is named by its heading
        if f"`{rel.name}`" not in text and f"`{rel}`" not in text and f"pgflow/{rel}" not in text:
            missing.append(str(rel))
    assert not missing, f"CONTRIBUTING.md's map does not name: {missing}"


def test_the_map_names_no_module_that_is_gone() -> None:
    text = _map_text()
    existing = {p.name for p in PACKAGE.rglob("*.py")}
    named = {
        name
        for folder, name in re.findall(r"`([\w/]+/)?(\w+\.py)`", text)
        if not folder.startswith(("tests/", "tools/", "bench/"))
    }
    assert named <= existing, f"CONTRIBUTING.md names modules that do not exist: {named - existing}"
