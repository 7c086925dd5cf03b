"""Maintenance of the remote tier: list, verify and garbage-collect what a fleet shares.

Library code over one ``RemoteTier`` (no click; ``tools/cli`` renders it):

* ``remote_sessions`` one row per remote session (and where it lives, given a local store);
* ``verify_remote`` fetch every block a remote record names and check it against its key
  (checksum), report records that do not unseal, blocks that are missing, references missing;
* ``gc_remote`` the janitor: per session, under its publish lock, finish or undo a publish that
  stopped half-way (the intent) and drop references no record backs; repair the listing index;
  delete blocks that no record references (they expire anyway: pending uploads and orphans
  carry a TTL) unless a writer holds a lease or a publish is under way (``force`` overrides).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from ..codec import verify_record
from ..errors import CorruptBlockError, TierstoreError
from ..records import SessionRecord
from ..tiers.schema import block_key

log = logging.getLogger(__name__)


@dataclass
class RemoteSessionInfo:
    name: str
    where: str                  # "remote", "both", "local"
    model: str | None
    tokens: int
    layers: int
    blocks: int
    version: int
    host: str | None
    updated: float | None
    forked_from: str | None
    conflict: str | None        # why a fork was made: "fenced", "conflict", "busy"
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def remote_sessions(remote, local_names=()) -> list[RemoteSessionInfo]:
    """Remote sessions, plus local-only ones named in ``local_names`` (where = "local")."""
    local = set(local_names)
    out = []
    for name in remote.names():
        raw, ver = remote.record(name)
        info = remote.info(name)
        where = "both" if name in local else "remote"
        if raw is None:
            continue
        try:
            rec = SessionRecord.unseal(name, raw)
        except TierstoreError as e:
            out.append(RemoteSessionInfo(name, where, None, 0, 0, 0, ver, info["host"], info["updated"], None, None,
                                         error=str(e)))
            continue
        conflict = rec.meta.get("conflict") or {}
        out.append(RemoteSessionInfo(name, where, rec.model_name, rec.length, rec.layout.num_layers, rec.num_blocks,
                                     ver, info["host"], info["updated"], rec.meta.get("forked_from"),
                                     conflict.get("reason")))
    have = {i.name for i in out}
    for name in sorted(local - have):
        out.append(RemoteSessionInfo(name, "local", None, 0, 0, 0, 0, None, None, None, None))
    return out


@dataclass
class RemoteProblem:
    session: str
    kind: str                   # "record", "missing", "corrupt", "unreferenced"
    reason: str
    layer: int | None = None
    block: int | None = None

    def where(self) -> str:
        parts = [f"session {self.session!r}"]
        if self.layer is not None:
            parts.append(f"layer {self.layer}")
        if self.block is not None:
            parts.append(f"block {self.block}")
        return ", ".join(parts)


@dataclass
class RemoteVerifyReport:
    url: str
    sessions: int = 0
    blocks: int = 0
    problems: list[RemoteProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"remote": self.url, "sessions": self.sessions, "blocks": self.blocks, "ok": self.ok,
                "problems": [asdict(p) for p in self.problems]}


def verify_remote(remote, names=(), *, batch: int = 16) -> RemoteVerifyReport:
    """Check every block of the remote records ``names`` (default: all)."""
    rep = RemoteVerifyReport(remote.url)
    for name in (list(names) or remote.names()):
        raw, _ = remote.record(name)
        if raw is None:
            rep.problems.append(RemoteProblem(name, "record", "no record on the remote tier"))
            continue
        try:
            rec = SessionRecord.unseal(name, raw)
        except TierstoreError as e:
            rep.problems.append(RemoteProblem(name, "record", str(e)))
            continue
        rep.sessions += 1
        chains, layers = rec.chains(), rec.layout.num_layers
        for i, ref in enumerate(remote.referenced(chains)):
            if not ref or name not in remote.members(chains[i]):
                rep.problems.append(RemoteProblem(name, "unreferenced", "position not referenced by this session: "
                                                  "its blocks may be evicted (`tierstore gc --remote` repairs it)",
                                                  block=i))
        for at in range(0, len(chains), batch):
            idx = list(range(at, min(at + batch, len(chains))))
            got = remote.fetch([remote.keys.block(chains[i], la) for i in idx for la in range(layers)])
            for j, data in enumerate(got):
                i, layer = idx[j // layers], j % layers
                rep.blocks += 1
                if data is None:
                    rep.problems.append(RemoteProblem(name, "missing", "block not on the remote tier", layer, i))
                    continue
                try:
                    verify_record(block_key(chains[i], layer), data, session=name, layer=layer, block=i)
                except CorruptBlockError as e:
                    rep.problems.append(RemoteProblem(name, "corrupt", e.reason, layer, i))
    return rep


@dataclass
class RemoteGcReport:
    url: str
    sessions_checked: int = 0
    stale_references: int = 0       # (position, session) pairs dropped: no record backs them
    intents_resolved: int = 0
    index_fixed: int = 0
    orphan_keys: int = 0            # block/summary keys no record references
    orphan_bytes: int = 0
    deleted: bool = False
    skipped_busy: list[str] = field(default_factory=list)   # sessions whose publish lock was held
    live_leases: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def gc_remote(replica, *, dry_run: bool = False, force: bool = False) -> RemoteGcReport:
    """The janitor (see the module doc). ``replica``: a ``Replica`` (it owns the publish lock
    and the recovery of a half-done publish)."""
    remote, keys = replica.remote, replica.remote.keys
    rep = RemoteGcReport(remote.url)
    # who each reference set names
    named_in: dict[str, list[bytes]] = {}
    refs_of: dict[bytes, list[str]] = {}
    for k in remote.scan(keys.refs_pattern()):
        chain = keys.chain_of(k)
        if chain is None:
            continue
        members = remote.members(chain)
        refs_of[chain] = members
        for m in members:
            named_in.setdefault(m, []).append(chain)
    sessions = set(remote.names()) | set(named_in)
    for k in remote.scan(f"{keys.p}:s:{{*}}"):
        n = keys.session_of(k)
        if n is not None:
            sessions.add(n)
    for name in sorted(sessions):
        token = None if dry_run else replica._lock_publish(name)
        if token is None and not dry_run:
            rep.skipped_busy.append(name)
            continue
        try:
            rep.sessions_checked += 1
            if remote.intent(name):
                rep.intents_resolved += 1
                if not dry_run:
                    replica._recover(name)
            raw, _ = remote.record(name)
            named = set(replica._chains_of(name, raw))
            stale = [c for c in named_in.get(name, []) if c not in named]
            rep.stale_references += len(stale)
            if stale and not dry_run:
                layers = SessionRecord.unseal(name, raw).layout.num_layers if raw else _layers_of(remote, stale[0])
                remote.unref(name, stale, layers)
            in_index = name in set(remote.names())
            if (raw is not None) != in_index:
                rep.index_fixed += 1
                if not dry_run:
                    remote.index(name, present=raw is not None)
        finally:
            if token is not None:
                remote.unlock(name, token)
    # blocks no record references
    leases = list(remote.scan(f"{keys.p}:s:{{*}}:lease")) + list(remote.scan(f"{keys.p}:s:{{*}}:pub"))
    rep.live_leases = len(leases)
    refs_of.clear()  # the sessions' repairs above changed them
    orphans = []
    for k in remote.scan(keys.block_pattern()):
        chain = keys.chain_of(k)
        if chain is None:
            continue
        if chain not in refs_of:
            refs_of[chain] = remote.members(chain)
        if not refs_of[chain]:
            orphans.append(k)
    if orphans:
        sizes = remote._do(lambda c: _strlens(c, orphans))
        rep.orphan_keys, rep.orphan_bytes = len(orphans), sum(sizes)
    if orphans and not dry_run and (force or not leases):
        # a position referenced since the scan keeps its blocks: check again, key by key
        still = [k for k in orphans if not remote.referenced([keys.chain_of(k)])[0]]
        remote.delete_keys(still)
        rep.deleted = True
    return rep


def _layers_of(remote, chain: bytes) -> int:
    n = 0
    while remote.fetch([remote.keys.block(chain, n)])[0] is not None:
        n += 1
    return max(n, 1)


def _strlens(c, keys) -> list[int]:
    pipe = c.pipeline(transaction=False)
    for k in keys:
        pipe.strlen(k)
    return [int(x) for x in pipe.execute()]
