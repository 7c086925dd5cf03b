"""The import graph points one way: tools → adapters → api → manager → components → tiers/codec.

Read from the source (every import, the lazy ones inside functions too), so a change that makes
a lower layer reach up fails here, naming the module and the import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"tierstore": ROOT / "tierstore", "tierstore.adapters": ROOT / "adapters", "tierstore.tools": ROOT / "tools"}
LEAVES = {"tierstore.errors", "tierstore.layout", "tierstore.chain"}  # what the storage layer may use of the core


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, base in PACKAGES.items():
        for p in base.rglob("*.py"):
            rel = p.relative_to(base).with_suffix("").parts
            if pkg == "tierstore" and rel and rel[0] in ("adapters", "tools"):
                continue
            name = ".".join((pkg, *rel[:-1])) if rel[-1] == "__init__" else ".".join((pkg, *rel))
            out[name] = p
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The tierstore modules ``name`` imports (relative imports resolved)."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "tierstore"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "tierstore":
                # ``from tierstore import api`` names a module too
                out |= {f"{target}.{a.name}" for a in node.names} if not node.module or target == "tierstore" else {target}
    return out


MODULES = _modules()
GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _under(mod: str, *prefixes: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def test_the_scan_sees_every_layer():
    assert {"tierstore.manager", "tierstore.tiers.cold", "tierstore.codec.readers", "tierstore.adapters.hf",
            "tierstore.tools.cli"} <= set(MODULES) | {m.rsplit(".", 1)[0] for m in MODULES}
    assert "tierstore.tiers.schema" in GRAPH["tierstore.tiers.cold"] or any(
        _under(t, "tierstore.tiers") for t in GRAPH["tierstore.tiers.cold"])


@pytest.mark.parametrize("rule", ["core", "adapters", "storage", "components"])
def test_imports_only_point_down(rule):
    bad = []
    for mod, targets in GRAPH.items():
        for t in targets:
            if rule == "core" and not _under(mod, "tierstore.adapters", "tierstore.tools") \
                    and _under(t, "tierstore.adapters", "tierstore.tools"):
                bad.append((mod, t))
            elif rule == "adapters" and _under(mod, "tierstore.adapters") and _under(t, "tierstore.tools"):
                bad.append((mod, t))
            elif rule == "storage" and _under(mod, "tierstore.tiers", "tierstore.codec") \
                    and not (_under(t, "tierstore.tiers", "tierstore.codec") or t in LEAVES):
                bad.append((mod, t))
            elif rule == "components" and not _under(mod, "tierstore.adapters", "tierstore.tools") \
                    and mod not in ("tierstore", "tierstore.api", "tierstore.manager") \
                    and _under(t, "tierstore.api", "tierstore.manager"):
                bad.append((mod, t))
    assert not bad, f"imports against the layering ({rule}): " + ", ".join(f"{m} -> {t}" for m, t in sorted(bad))
