"""``python -m tierstore.tools.cli``: the ``tierstore`` command."""

from . import main

main()
