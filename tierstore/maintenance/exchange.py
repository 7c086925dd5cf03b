"""Export a session to one portable file, and import it back: safetensors + JSON metadata.

File layout (``safetensors``; never pickle):

* tensors ``layer.{i}.k`` and ``layer.{i}.v``: ``[kv_heads, length, head_dim]`` in the session's
  KV dtype, one pair per layer; ``token_ids``: int64 ``[length]``; optional ``last_logits``:
  float32 ``[vocab]``.
* safetensors ``metadata`` (str -> str): ``format`` = ``"tierstore-session"``,
  ``format_version``, and ``session``: JSON of the record's fields (name, layout, fingerprint,
  fingerprint_fields, codec, model/tokenizer names, pad, meta, timestamps, length) plus
  ``checksum`` = ``{"algo": "xxh3_128", "hex": ...}`` over every tensor (name, dtype, shape,
  bytes; names sorted), so a file edited after export fails on import.

``import_session`` validates everything before it opens the store for writing: a bad file
leaves the store (and a store directory that does not exist yet) untouched.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from collections.abc import Mapping

import numpy as np
import torch
import xxhash

from ..codec import CodecConfig
from ..errors import FormatVersionError, ImportFormatError, SessionExistsError, TierstoreError
from ..layout import FORMAT_VERSION, KVLayout, check_session_name, dtype_name
from ..records import SessionRecord

FILE_FORMAT = "tierstore-session"
CHECKSUM_ALGO = "xxh3_128"
MAX_HEADER_BYTES = 100 << 20        # safetensors' own limit
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+, torch.save zip


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """xxh3_128 over every tensor's name, dtype, shape and bytes, names sorted."""
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, dtype_name(t.dtype), list(t.shape)]).encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def export_session(store, name: str, path: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Write session ``name`` of ``store`` to ``path``; returns the metadata written.

    The file appears atomically (written beside ``path``, then renamed). FileExistsError if
    ``path`` exists and not ``overwrite``.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --force (overwrite=True) to replace it")
    rec, kv = store.load_session(name)
    tensors: dict[str, torch.Tensor] = {}
    for i, (k, v) in enumerate(kv):
        tensors[f"layer.{i}.k"], tensors[f"layer.{i}.v"] = k.contiguous(), v.contiguous()
    tensors["token_ids"] = torch.from_numpy(np.asarray(rec.token_ids, dtype=np.int64).copy())
    if rec.last_logits is not None:
        tensors["last_logits"] = torch.from_numpy(np.asarray(rec.last_logits, dtype=np.float32).copy())
    session = {
        "name": rec.name, "layout": rec.layout.to_json(), "fingerprint": rec.fingerprint,
        "fingerprint_fields": rec.fingerprint_fields, "codec": rec.codec.to_json(), "length": rec.length,
        "pad": rec.pad, "model_name": rec.model_name, "tokenizer_name": rec.tokenizer_name,
        "created": rec.created, "updated": rec.updated, "meta": rec.meta,
        "format_version": rec.format_version,
        "checksum": {"algo": CHECKSUM_ALGO, "hex": tensors_checksum(tensors)},
    }
    metadata = {"format": FILE_FORMAT, "format_version": str(FORMAT_VERSION),
                "session": json.dumps(session, sort_keys=True)}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tierstore-export-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return metadata


# -- import --------------------------------------------------------------------------------


def _bad(path: str, why: str) -> ImportFormatError:
    return ImportFormatError(f"{path}: {why}")


def _check_container(path: str) -> None:
    """Refuse anything that is not a safetensors file before a parser sees it."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if size < 8:
                raise _bad(path, f"not a tierstore export (file of {size} bytes is too short for safetensors)")
            if head.startswith(_PICKLE_MAGIC):
                raise _bad(path, "is a pickle / torch.save file, not a safetensors export; refusing to load "
                           "it (unpickling can run arbitrary code)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise _bad(path, f"not a tierstore export (safetensors header of {n} bytes does not fit "
                           f"a file of {size} bytes: truncated or not safetensors)")
            header = f.read(n)
    except OSError as e:
        raise _bad(path, f"cannot read: {e.strerror or e}") from None
    try:
        h = json.loads(header)
    except ValueError:
        raise _bad(path, "not a tierstore export (safetensors header is not JSON)") from None
    if not isinstance(h, dict):
        raise _bad(path, "not a tierstore export (safetensors header is not a JSON object)")
    data_len = size - 8 - n
    for name, spec in h.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in spec["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise _bad(path, f"tensor {name!r}: malformed safetensors entry") from None
        if not 0 <= start <= end <= data_len:
            raise _bad(path, f"tensor {name!r}: data [{start}, {end}) lies past the end of the file "
                       f"({data_len} data bytes): truncated")


def _metadata(path: str, raw: Mapping[str, str] | None) -> dict:
    raw = raw or {}
    if raw.get("format") != FILE_FORMAT:
        raise _bad(path, f"safetensors file is not a tierstore session export (format {raw.get('format')!r})")
    try:
        version = int(raw.get("format_version", ""))
    except ValueError:
        raise _bad(path, f"bad format_version {raw.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise FormatVersionError(f"{path}: written by export format version {version}; this tierstore "
                                 f"reads <= {FORMAT_VERSION}")
    try:
        s = json.loads(raw["session"])
    except (KeyError, ValueError):
        raise _bad(path, "metadata 'session' is missing or not JSON") from None
    if not isinstance(s, dict):
        raise _bad(path, "metadata 'session' is not a JSON object")
    missing = [f for f in ("name", "layout", "fingerprint", "fingerprint_fields", "codec", "length",
                           "checksum", "format_version") if f not in s]
    if missing:
        raise _bad(path, f"metadata lacks {', '.join(missing)}")
    if int(s["format_version"]) > FORMAT_VERSION:
        raise FormatVersionError(f"{path}: session written by format version {s['format_version']}; this "
                                 f"tierstore reads <= {FORMAT_VERSION}")
    return s


def read_export(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Open and fully validate an export file: ``(session metadata, tensors)``.

    Raises ``ImportFormatError`` (or ``FormatVersionError``) naming what is wrong.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    _check_container(path)
    try:
        with safe_open(path, framework="pt") as f:
            s = _metadata(path, f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except TierstoreError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError or whatever else the parser trips on
        raise _bad(path, f"not a valid safetensors file ({type(e).__name__}: {e})") from None
    try:
        layout = KVLayout.from_json(s["layout"])
        CodecConfig.from_json(s["codec"])
        length = int(s["length"])
    except (ValueError, KeyError, TypeError) as e:
        raise _bad(path, f"bad layout/codec metadata ({e})") from None
    for field, types in (("name", str), ("fingerprint", str), ("fingerprint_fields", dict),
                         ("meta", (dict, type(None))), ("model_name", (str, type(None))),
                         ("tokenizer_name", (str, type(None))), ("pad", int)):
        if not isinstance(s.get(field, 0 if field == "pad" else None), types):
            raise _bad(path, f"metadata field {field!r} has the wrong type ({type(s[field]).__name__})")
    if s.get("pad", 0) < 0:
        raise _bad(path, "metadata field 'pad' is negative")
    if len(tensors) not in (2 * layout.num_layers + 1, 2 * layout.num_layers + 2):
        raise _bad(path, f"{len(tensors)} tensors do not match the layout ({layout.num_layers} layers: "
                   f"K and V per layer, token_ids, optional last_logits)")
    want_names = {f"layer.{i}.{kv}" for i in range(layout.num_layers) for kv in "kv"} | {"token_ids"}
    names = set(tensors)
    if not want_names <= names or not names <= want_names | {"last_logits"}:
        extra, lost = names - want_names - {"last_logits"}, want_names - names
        raise _bad(path, "tensors do not match the layout "
                   f"({layout.num_layers} layers): missing {sorted(lost)[:4]}, unexpected {sorted(extra)[:4]}")
    ids = tensors["token_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 1 or ids.shape[0] != length:
        raise _bad(path, f"token_ids is {ids.dtype} {tuple(ids.shape)}; expected int64 ({length},)")
    if length and (int(ids.min()) < 0 or int(ids.max()) >= 2**32):
        raise _bad(path, "token ids out of range [0, 2**32)")
    want = (layout.kv_heads, length, layout.head_dim)
    for i in range(layout.num_layers):
        for kv in "kv":
            t = tensors[f"layer.{i}.{kv}"]
            if tuple(t.shape) != want or t.dtype != layout.dtype:
                raise _bad(path, f"tensor layer.{i}.{kv} is {t.dtype} {tuple(t.shape)}; the layout says "
                           f"{layout.dtype} {want}")
    logits = tensors.get("last_logits")
    if logits is not None and (logits.dtype != torch.float32 or logits.dim() != 1):
        raise _bad(path, f"last_logits is {logits.dtype} {tuple(logits.shape)}; expected float32 [vocab]")
    ck = s["checksum"]
    if not isinstance(ck, dict) or ck.get("algo") != CHECKSUM_ALGO:
        raise _bad(path, f"unsupported checksum {ck!r}")
    if tensors_checksum(tensors) != ck.get("hex"):
        raise _bad(path, "checksum mismatch: the tensors are not the ones exported")
    return s, tensors


def import_session(store, path: str | os.PathLike, as_name: str | None = None, *,
                   overwrite: bool = False) -> SessionRecord:
    """Validate ``path`` and store it in ``store`` (writable) as ``as_name`` or its exported name.

    SessionExistsError if the name exists and not ``overwrite``; nothing is written unless
    the whole file is valid.
    """
    s, tensors = read_export(path)
    return put_export(store, s, tensors, as_name, overwrite=overwrite)


def put_export(store, s: dict, tensors: dict[str, torch.Tensor], as_name: str | None = None, *,
               overwrite: bool = False) -> SessionRecord:
    """Store what ``read_export`` returned (``Store.put_session``)."""
    name = check_session_name(as_name if as_name is not None else s["name"])
    if not overwrite and store.exists(name):
        raise SessionExistsError("session already exists; pass --overwrite to replace it", session=name)
    layout = KVLayout.from_json(s["layout"])
    kv = [(tensors[f"layer.{i}.k"], tensors[f"layer.{i}.v"]) for i in range(layout.num_layers)]
    logits = tensors.get("last_logits")
    kwargs = dict(layout=layout, kv=kv, token_ids=tensors["token_ids"].numpy(), fingerprint=str(s["fingerprint"]),
                  fingerprint_fields=dict(s["fingerprint_fields"]),
                  last_logits=None if logits is None else logits.numpy().copy(),
                  model_name=s.get("model_name"), tokenizer_name=s.get("tokenizer_name"),
                  meta=dict(s.get("meta") or {}), codec=CodecConfig.from_json(s["codec"]), overwrite=overwrite)
    pad = int(s.get("pad", 0))
    if pad:
        return _put_padded(store, name, pad, **kwargs)
    return store.put_session(name, **kwargs)


def _put_padded(store, name: str, pad: int, *, layout, kv, token_ids, codec, overwrite, **fields) -> SessionRecord:
    """``Store.put_session`` for a record with left padding (``put_session`` has no ``pad=``)."""
    now = time.time()
    rec = SessionRecord(name=name, layout=layout, codec=codec, token_ids=np.asarray(token_ids, dtype=np.int64),
                        pad=pad, created=now, updated=now, **fields)
    lease = store.sessions.acquire(name)
    try:
        chains = rec.chains()
        for layer, (k, v) in enumerate(kv):
            store.sessions.put_blocks(store.encode_blocks(rec, layer, k, v, chains, codec))
        return store.sessions.commit(rec, expect_new=not overwrite)
    finally:
        store.sessions.release(lease)


__all__ = ["export_session", "import_session", "put_export", "read_export", "tensors_checksum"]
