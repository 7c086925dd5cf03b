"""Packaging (DESIGN §8): one ``tierstore`` namespace mapped from three folders, nothing installed
at the top level but ``tierstore``, and the ``tierstore`` console script."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
FOLDERS = ("tierstore", "adapters", "tools")


def _package_folders() -> list[Path]:
    """Every folder under the three roots that holds a .py file (caches and hidden dirs aside)."""
    out = []
    for top in FOLDERS:
        for d in [ROOT / top, *sorted(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            rel = d.relative_to(ROOT).parts
            if any(part == "__pycache__" or part.startswith(".") for part in rel):
                continue
            if any(f.suffix == ".py" for f in d.iterdir()):
                out.append(d)
    return out


def _package_name(folder: Path) -> str:
    """The dotted package a folder installs as, through ``package-dir``."""
    rel = folder.relative_to(ROOT).as_posix()
    best = max((src for src in SETUPTOOLS["package-dir"].values()
                if rel == src or rel.startswith(src + "/")), key=len, default=None)
    assert best is not None, f"{rel} is under no package-dir entry"
    pkg = next(p for p, src in SETUPTOOLS["package-dir"].items() if src == best)
    rest = rel[len(best):].strip("/")
    return pkg + ("." + rest.replace("/", ".") if rest else "")


def test_package_dir_maps_the_three_folders_into_one_namespace():
    assert SETUPTOOLS["package-dir"] == {"tierstore": "tierstore", "tierstore.adapters": "adapters",
                                         "tierstore.tools": "tools"}
    assert all(p == "tierstore" or p.startswith("tierstore.") for p in SETUPTOOLS["packages"])


@pytest.mark.parametrize("folder", _package_folders(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_package_folder_is_listed(folder):
    assert (folder / "__init__.py").exists(), f"{folder}: package folder without __init__.py"
    assert _package_name(folder) in SETUPTOOLS["packages"], (
        f"{folder.relative_to(ROOT)} holds Python files but {_package_name(folder)!r} is not in "
        "[tool.setuptools] packages: a wheel would ship without it")


def test_listed_packages_exist():
    names = {_package_name(f) for f in _package_folders()}
    assert set(SETUPTOOLS["packages"]) <= names


def test_py_typed_is_shipped():
    assert (ROOT / "tierstore" / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["tierstore"]


def test_console_script_exists_and_resolves():
    script = Path(sys.executable).parent / "tierstore"
    assert script.is_file() and os.access(script, os.X_OK), script
    eps = [ep for ep in md.distribution("tierstore").entry_points if ep.group == "console_scripts"]
    assert [ep.name for ep in eps] == ["tierstore"]
    assert eps[0].value == PYPROJECT["project"]["scripts"]["tierstore"]
    assert callable(eps[0].load())


_PROBE = """
import importlib.metadata as md, importlib.util, json
d = md.distribution("tierstore")
print(json.dumps({
    "files": [str(f) for f in (d.files or [])],
    "top_level": (d.read_text("top_level.txt") or "").split(),
    "adapters": importlib.util.find_spec("adapters") is not None,
    "tools": importlib.util.find_spec("tools") is not None,
    "sub": [importlib.util.find_spec(m).origin for m in ("tierstore.adapters", "tierstore.tools",
                                                          "tierstore.codec", "tierstore.tiers.cold")],
    "dists": {k: v for k, v in md.packages_distributions().items() if k in ("adapters", "tools")},
}))
"""


def test_no_top_level_adapters_or_tools_installed(tmp_path):
    # run outside the checkout: from the repo root, ``adapters`` is importable as a plain folder
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["top_level"] == ["tierstore"]
    for f in got["files"]:
        assert not f.startswith(("adapters/", "tools/")), f
    assert not got["adapters"] and not got["tools"]
    assert got["dists"] == {}
    origins = [Path(o) for o in got["sub"]]
    assert origins[0] == ROOT / "adapters" / "__init__.py"
    assert origins[1] == ROOT / "tools" / "__init__.py"


def test_wheel_ships_every_module_under_tierstore_only(tmp_path):
    """Build a real wheel from a copy of the sources (the checkout stays untouched)."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    for top in FOLDERS:
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    code = ("import sys; from setuptools import build_meta as b; "
            f"print(b.build_wheel({str(dist)!r}))")
    dist.mkdir()
    out = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = dist / out.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"tierstore"}
    missing = []
    for folder in _package_folders():
        pkg_path = _package_name(folder).replace(".", "/")
        for f in folder.glob("*.py"):
            if f"{pkg_path}/{f.name}" not in names:
                missing.append(f"{pkg_path}/{f.name}")
    assert not missing, f"modules missing from the wheel: {missing}"
    assert "tierstore/py.typed" in names
