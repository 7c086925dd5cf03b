"""tierstore: a tiered, persistent KV-cache store for transformers models.

>>> import tierstore
>>> with tierstore.open("./kv", hot="1GiB", warm="8GiB") as store:
...     print([s.name for s in store.list()])
"""

from .api import Store, open
from .codec import CodecConfig
from . import errors as _errors
from .errors import *  # noqa: F403 - the typed errors are part of the API
from .layout import KVLayout, parse_size

__version__ = "0.1.0"
__all__ = ["open", "Store", "CodecConfig", "KVLayout", "parse_size", "__version__"] + [
    n for n in vars(_errors) if n.endswith("Error")]
