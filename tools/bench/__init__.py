"""Benchmarks of ``tierstore bench <name>``: one module (or package) per benchmark, each defining a
click command called ``<name>`` that prints a table (``--json`` for one JSON object). They are
measurements, not timed tests; run them alone (README "Benchmarks")."""
