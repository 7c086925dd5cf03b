"""Maintenance of a store, as library code (no click, no rendering): what the ``tierstore``
command asks for facts and plans, and what other code (benchmarks, tests) may call directly.

* ``scan``      one read snapshot of a store, scanned into frozen facts (``ls``/``show``/``stat``)
* ``verify``    decode every block and check what ties records, blocks, summaries and refs together
* ``plan``      which sessions ``rm``/``prune`` delete and what that frees (``--dry-run`` = ``-y``)
* ``compact``   LMDB's compacting copy, swapped in atomically while the store is idle
* ``exchange``  export a session to safetensors + JSON metadata, and import it back

Deletion, gc and commits are the core's (``tierstore.sessions``); the on-disk layout is
``tierstore.tiers.schema``'s.
"""
