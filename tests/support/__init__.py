"""Shared test support (``from support import ...``; ``tests/conftest.py`` puts ``tests/`` on
``sys.path``, since pytest runs with ``--import-mode=importlib`` and ``tests`` is no package).

- ``kv``: ``bits``/``same_bits``/``assert_kv_equal`` (bit-exact), ``random_kv`` (a session's
  K/V), ``random_layer_kv``, ``random_bits``, ``prefix_kv``.
- ``models``: ``tiny`` (seeded tiny Llama/Qwen2/Mistral/GPT-2), ``tiny_config``, ``greedy``,
  ``max_dlogit``.
- ``stores``: ``file_digest``, ``key_of``. The store fixtures (``store``,
  ``store_factory``, ``model``) are in ``tests/conftest.py``.
"""

from support.kv import (assert_kv_equal, bits, generator, prefix_kv, random_bits, random_kv, random_layer_kv,
                        same_bits)
from support.models import LLAMA_LIKE, greedy, max_dlogit, tiny, tiny_config
from support.stores import file_digest, key_of

__all__ = ["LLAMA_LIKE", "assert_kv_equal", "bits", "file_digest", "generator", "greedy", "key_of", "max_dlogit",
           "prefix_kv", "random_bits", "random_kv", "random_layer_kv", "same_bits", "tiny",
           "tiny_config"]
