"""Model fingerprint and KV layout of a transformers model."""

from __future__ import annotations

import hashlib

import torch

from tierstore.layout import KVLayout, dtype_name, fingerprint_digest

_CONFIG_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                  "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
                  "sliding_window", "use_sliding_window", "scale_attn_by_inverse_layer_idx", "n_positions")


def kv_layout(model, block_tokens: int, dtype: torch.dtype | None = None) -> KVLayout:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return KVLayout(num_layers=cfg.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim,
                    block_tokens=block_tokens, dtype=dtype or model.dtype)


def weights_digest(model, nbytes: int = 1 << 16) -> str:
    """Hash of a few weight bytes from the first and the last parameters (two checkpoints of one
    config differ here), cheap even for big models."""
    h = hashlib.blake2b(digest_size=16)
    params = list(model.named_parameters())
    for name, p in params[:2] + params[-2:]:
        flat = p.detach().reshape(-1)[: nbytes // max(1, p.element_size())]
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
