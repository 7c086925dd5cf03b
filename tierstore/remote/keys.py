"""Key schema of the remote tier: the one module that knows how tierstore lies in Redis.

Every key starts with the namespace (``ts`` unless the URL says ``?prefix=``). Keys that one
Lua step touches together share a hash tag (the part in braces), so they sit in one cluster
slot and the step is atomic on Redis Cluster too:

* a chain position ``{<chain hex>}``: ``:b<layer>`` block records, ``:s<layer>`` summaries,
  ``:r`` the *set* of session names whose record names the position (idempotent to replay,
  unlike a counter). A block no set names carries a TTL (pending upload, or orphaned), so
  ``maxmemory-policy volatile-*`` only ever evicts unreferenced blocks;
* a session ``s:{<name>}``: a hash with ``rec`` (the sealed record, the one point of
  visibility), ``ver`` (commits so far), ``fence`` (the last fencing token issued), ``digest``,
  ``host``, ``updated``; ``s:{<name>}:lease`` the writer lease (expires); ``s:{<name>}:intent``
  the chain positions a publish in progress may have referenced (finished or undone by the
  next writer, see ``RemoteTier.recover``);
* ``sessions``: the set of session names (an index for listing; repaired by ``gc``).

Chain hashes already cover the model fingerprint, the KV layout and every mark (``chain.py``):
never Python's ``hash()``.
"""

from __future__ import annotations

from ..chain import CHAIN_BYTES


class Keys:
    def __init__(self, prefix: str = "ts") -> None:
        self.p = prefix

    def position(self, chain: bytes) -> str:
        return f"{self.p}:{{{chain.hex()}}}"

    def refs(self, chain: bytes) -> str:
        return self.position(chain) + ":r"

    def block(self, chain: bytes, layer: int) -> str:
        return f"{self.position(chain)}:b{layer}"

    def summary(self, chain: bytes, layer: int) -> str:
        return f"{self.position(chain)}:s{layer}"

    def position_keys(self, chain: bytes, layers: int) -> list[str]:
        """refs, then every layer's block, then every layer's summary (the Lua steps' KEYS)."""
        return ([self.refs(chain)] + [self.block(chain, i) for i in range(layers)]
                + [self.summary(chain, i) for i in range(layers)])

    def session(self, name: str) -> str:
        return f"{self.p}:s:{{{name}}}"

    def lease(self, name: str) -> str:
        return self.session(name) + ":lease"

    def intent(self, name: str) -> str:
        return self.session(name) + ":intent"

    def ack(self, tag: int) -> str:
        """A short-lived key written just before a ``WAIT`` (``tag`` picks the node's slot)."""
        return f"{self.p}:ack:{{{tag}}}"

    @property
    def index(self) -> str:
        return f"{self.p}:sessions"

    def refs_pattern(self) -> str:
        return f"{self.p}:{{*}}:r"

    def block_pattern(self) -> str:
        return f"{self.p}:{{*}}:[bs]*"

    def chain_of(self, key: bytes | str) -> bytes | None:
        """The chain position a position key belongs to (None: not one of ours)."""
        k = key.decode() if isinstance(key, bytes) else key
        head = self.p + ":{"
        if not k.startswith(head):
            return None
        end = k.find("}", len(head))
        try:
            chain = bytes.fromhex(k[len(head):end])
        except ValueError:
            return None
        return chain if len(chain) == CHAIN_BYTES else None

    def session_of(self, key: bytes | str) -> str | None:
        k = key.decode() if isinstance(key, bytes) else key
        head = self.p + ":s:{"
        if not (k.startswith(head) and k.endswith("}")):
            return None
        return k[len(head):-1]


def pack_chains(chains) -> bytes:
    return b"".join(chains)


def unpack_chains(raw: bytes | None) -> list[bytes]:
    raw = raw or b""
    return [raw[i:i + CHAIN_BYTES] for i in range(0, len(raw) - len(raw) % CHAIN_BYTES, CHAIN_BYTES)]
