"""The remote tier: a shared Redis (single node or cluster) below the local LMDB, for every host.

``RemoteTier`` (``tier.py``) is the one code that speaks Redis: keys (``keys.py``), the Lua
steps of the commit protocol, leases with fencing tokens. ``Replica`` (``replica.py``) ties one
host's ``SessionStore`` to it: pull on read, publish on commit through a durable outbox, leases
renewed by a heartbeat. The protocol and why it is safe on Redis Cluster: docs/decisions.md
("Remote tier").
"""

from .client import parse_remote
from .replica import Replica
from .tier import RemoteTier

__all__ = ["RemoteTier", "Replica", "parse_remote"]
