"""Shared fixtures. Helpers that are not fixtures live in ``tests/support`` (``from support
import ...``): pytest runs with ``--import-mode=importlib`` and ``tests/`` is no package, so this
file puts ``tests/`` on ``sys.path`` before any test module is imported.

- ``store_factory``: ``open(name="kv", **options)`` opens ``tmp_path / name``; every store it
  opened is closed at teardown (closing one the test already closed is harmless).
- ``store``: one open store at ``tmp_path / "kv"``; its options (budgets, block size, codec)
  come from the closest ``@pytest.mark.store(**options)`` (a test's, a class's or the module's
  ``pytestmark``) and from ``indirect`` parametrisation (``request.param``, a dict) over them.
- ``model``: the crash-writer trials' tiny Llama (``tools/crash_writer.tiny_model``), once per
  module.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


def pytest_configure(config):
    config.addinivalue_line("markers", "store(**options): options of the `store` fixture's tierstore.open")


@pytest.fixture
def store_factory(tmp_path):
    import tierstore

    opened = []

    def open_store(name: str = "kv", **options):
        s = tierstore.open(tmp_path / name, **options)
        opened.append(s)
        return s

    yield open_store
    for s in reversed(opened):
        s.close()


@pytest.fixture
def store(request, store_factory):
    marker = request.node.get_closest_marker("store")
    options = {**(marker.kwargs if marker else {}), **getattr(request, "param", {})}
    return store_factory(**options)


@pytest.fixture(scope="module")
def model():
    from tierstore.tools import crash_writer as cw

    return cw.tiny_model()
