"""Conversation: tokenizer + chat template + TieredCache; commits after every turn."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.generation.streamers import BaseStreamer

from .hf import TieredCache


class _Pieces(BaseStreamer):
    """Decodes generated tokens incrementally and hands text pieces to a callback."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], skip: int) -> None:
        self.tok, self.on_text, self.skip = tokenizer, on_text, skip
        self.ids: list[int] = []
        self.shown = 0

    def put(self, value: torch.Tensor) -> None:
        if self.skip:  # the prompt is pushed first
            self.skip = 0
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.shown and not text.endswith("\ufffd"):
            self.on_text(text[self.shown:])
            self.shown = len(text)

    def end(self) -> None:
        pass


class Conversation:
    """A multi-turn chat whose KV lives in a tierstore session.

    ``say(text)`` renders the new turn with the tokenizer's chat template, generates the reply
    through the cache (no re-prefill of earlier turns) and commits. ``Conversation.resume``
    continues it in another process. The messages are kept in the session record's meta.
    """

    def __init__(self, store, model, tokenizer, session: str, *, system: str | None = None,
                 cache: TieredCache | None = None, **cache_kw) -> None:
        self.store, self.model, self.tok, self.session = store, model, tokenizer, session
        self.cache = cache or TieredCache(store, model, session, tokenizer_name=getattr(
            tokenizer, "name_or_path", None), **cache_kw)
        self.messages: list[dict] = list(self.cache.meta.get("messages", []))
        self.pending: list[int] = list(self.cache.meta.get("pending", []))  # generated, not yet fed
        if system and not self.messages:
            self.messages.append({"role": "system", "content": system})

    @classmethod
    def resume(cls, store, model, tokenizer, session: str, **cache_kw) -> "Conversation":
        return cls(store, model, tokenizer, session, cache=TieredCache.resume(store, model, session, **cache_kw))

    def _render(self, messages: list[dict], prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    def say(self, text: str, *, max_new_tokens: int = 256, on_text: Callable[[str], None] | None = None,
            prefix: str = "", **generate_kw) -> str:
        """Add a user turn, generate the assistant's reply, commit; returns the reply text.

        prefix: the first words of the assistant's reply, given instead of generated (the reply
        continues them; the returned text and the stored message start with them)."""
        before = self._render(self.messages, False) if self.messages else ""
        self.messages.append({"role": "user", "content": text})
        after = self._render(self.messages, True) + prefix
        if not after.startswith(before):
            raise ValueError("the chat template does not render earlier turns as a stable prefix")
        new_ids = self.tok(after[len(before):], add_special_tokens=False, return_tensors="pt").input_ids[0]
        full = self.cache.full_ids(self.pending + new_ids.tolist())
        streamer = _Pieces(self.tok, on_text, skip=1) if on_text else None
        out = self.model.generate(full, attention_mask=torch.ones_like(full), cache=self.cache,
                                  max_new_tokens=max_new_tokens, streamer=streamer,
                                  pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id,
                                  **{"do_sample": False, **generate_kw})
        reply_ids = out[0, full.shape[1]:].tolist()
        held = self.cache.get_seq_length()
        self.pending = out[0, held:].tolist()
        reply = prefix + self.tok.decode(reply_ids, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": reply})
        self.cache.meta.update(messages=self.messages, pending=self.pending)
        self.cache.commit()
        return reply

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> "Conversation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
