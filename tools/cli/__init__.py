"""The ``tierstore`` command (click): ``app`` holds the group and ``main``, the commands live by
kind in ``sessions``, ``maintenance`` and ``chat``; ``options`` and ``render`` serve them all.

``tierstore = "tierstore.tools.cli:main"`` is the console script; ``python -m tierstore.tools.cli``
runs the same ``main``.
"""

from .app import bench, cli, main

__all__ = ["bench", "cli", "main"]
