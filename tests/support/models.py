"""Tiny random HF models (seeded) and greedy generation.

``tiny()`` seeds the *global* torch generator before it builds the model (as the tests always
did), so what a test draws with ``torch.randint`` right after building one is fixed too.
"""

from __future__ import annotations

import torch

LLAMA_LIKE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
_GPT2 = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)


def tiny_config(kind: str = "llama", **overrides):
    """The config of a 2-layer, 64-wide model: ``llama``, ``qwen2``, ``mistral`` (no sliding
    window, 512 positions) or ``gpt2``; ``overrides`` replace config fields."""
    import transformers as tf

    if kind == "gpt2":
        return tf.GPT2Config(**{**_GPT2, **overrides})
    base = {"llama": (tf.LlamaConfig, {}), "qwen2": (tf.Qwen2Config, {}),
            "mistral": (tf.MistralConfig, {"max_position_embeddings": 512, "sliding_window": None})}
    cls, extra = base[kind]
    return cls(**{**LLAMA_LIKE, **extra, **overrides})


def tiny(kind: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A random tiny model in eval mode: ``torch.manual_seed(seed)``, then ``tiny_config``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(kind, **overrides)
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def greedy(model, ids, cache, **kw):
    """``model.generate`` greedy with scores (a ``GenerateOutput``); 24 new tokens by default."""
    kw.setdefault("max_new_tokens", 24)
    return model.generate(ids, cache=cache, do_sample=False, output_scores=True, return_dict_in_generate=True,
                          pad_token_id=0, **kw)


def max_dlogit(a, b) -> float:
    """The largest difference of two greedy outputs' scores."""
    return max((x - y).abs().max().item() for x, y in zip(a.scores, b.scores))


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """A character-level fast tokenizer (100 ids: 3 special tokens, newline, printable ASCII)
    with a ChatML-style chat template; built in memory, nothing is downloaded."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + ["\n"] + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_checkpoint(folder, seed: int = 0) -> str:
    """``tiny(seed=seed)`` and ``tiny_tokenizer()`` saved as a local transformers checkpoint
    (what ``from_pretrained(folder)`` loads); returns the folder."""
    tok = tiny_tokenizer()
    model = tiny(seed=seed)
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
