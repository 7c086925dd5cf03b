"""Model fingerprint and KV layout of a transformers model."""

from __future__ import annotations

import hashlib

import torch

from tierstore.layout import KVLayout, dtype_name, fingerprint_digest

_CONFIG_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                  "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
                  "sliding_window", "use_sliding_window", "scale_attn_by_inverse_layer_idx", "n_positions")


def tp_shard(model) -> tuple[int, int] | None:
    """``(rank, size)`` of a tensor-parallel model (transformers ``tp_plan``: its KV heads are
    split over the ranks of the mesh's ``tp`` dimension, rank r holding the r-th contiguous
    slice); None for a model that is not split."""
    size = int(getattr(model, "tp_size", None) or 1)
    if size <= 1:
        return None
    mesh = getattr(model, "_device_mesh", None) or getattr(model, "device_mesh", None)
    if mesh is not None:
        try:
            return int(mesh["tp"].get_local_rank()), size
        except (KeyError, RuntimeError, TypeError):
            pass
    import torch.distributed as dist
    return dist.get_rank() % size, size


def shard_meta(model) -> dict | None:
    """What a shard's record says about it: ``{"rank", "size", "heads": [first, end), "kv_heads"}``
    (``kv_heads``: the whole model's)."""
    shard = tp_shard(model)
    if shard is None:
        return None
    rank, size = shard
    total = _config_kv_heads(model)
    if total % size:
        raise ValueError(f"{type(model).__name__}: {total} KV heads cannot be split over {size} tensor-parallel ranks")
    per = total // size
    return {"rank": rank, "size": size, "heads": [rank * per, (rank + 1) * per], "kv_heads": total}


def _config_kv_heads(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def kv_layout(model, block_tokens: int, dtype: torch.dtype | None = None) -> KVLayout:
    """The KV layout of ``model`` as its cache sees it: a tensor-parallel rank holds its own
    share of the KV heads."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = _config_kv_heads(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    shard = shard_meta(model)
    if shard is not None:
        kv_heads = shard["heads"][1] - shard["heads"][0]
    return KVLayout(num_layers=cfg.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim,
                    block_tokens=block_tokens, dtype=dtype or model.dtype)


def weights_digest(model, nbytes: int = 1 << 16) -> str:
    """Hash of a few weight bytes from the first and the last parameters (two checkpoints of one
    config differ here), cheap even for big models."""
    h = hashlib.blake2b(digest_size=16)
    params = list(model.named_parameters())
    for name, p in params[:2] + params[-2:]:
        p = p.detach()
        if hasattr(p, "full_tensor"):  # a tensor-parallel shard (DTensor): the whole weight, so
            p = p.full_tensor()        # every TP degree of one checkpoint has one fingerprint
        flat = p.reshape(-1)[: nbytes // max(1, p.element_size())]
        h.update(name.encode())
        h.update(flat.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model) -> tuple[str, dict]:
    """(hex digest, fields): architecture numbers, RoPE parameters, KV dtype and weight bytes."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    fields = {f: getattr(cfg, f, None) for f in _CONFIG_FIELDS}
    fields["architectures"] = getattr(model.config, "architectures", None) or [type(model).__name__]
    fields["dtype"] = dtype_name(model.dtype)
    fields["weights"] = weights_digest(model)
    fields = {k: (v if isinstance(v, (int, float, str, bool, list, dict, type(None))) else str(v))
              for k, v in fields.items()}
    return fingerprint_digest(fields), fields
