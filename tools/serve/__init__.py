"""``tierstore serve``: an OpenAI-compatible chat server whose conversations resume from the store
by prefix, across restarts (needs the ``serve`` extra: ``pip install "tierstore[serve]"``).

``protocol`` the wire format (requests, errors, chunks), ``engine`` the worker threads that share
the model and the store (bounded queue, prefix resume, generate, commit), ``metrics`` the
Prometheus registry, ``app`` the FastAPI routes and uvicorn, ``process`` a server in a child
process (for benchmarks and tests).
"""
