"""The generation engine: one worker thread owns the model, its tokenizer and the store.

transformers models and ``TieredCache`` are not thread-safe, so every request runs on one
worker thread, one at a time, in arrival order; the event loop only parses, waits and writes.
In front of the worker is a bounded admission count (``max_queue`` waiting + the one running):
a request beyond it is refused at once with 429 and a ``Retry-After`` estimated from recent
service times, never queued without bound. A request runs as: render the messages with the chat
template, resume the longest stored prefix of its token ids (``adapters.prefix``), prefill the
rest and generate, commit the new state (so the next turn resumes it), close the cache. A job
whose client went away (``Job.cancel``) stops at its next token; so does every job once the
engine drains (SIGTERM); both still commit what they hold.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from tierstore.errors import ModelMismatchError, SessionBusyError, TierstoreError

from .protocol import ApiError, Sampling, Usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """model: ``smollm2`` or a local transformers checkpoint folder; store: the store folder.
    hot/warm/block_tokens: ``tierstore.open`` settings; policy/budget_tokens: ``TieredCache``'s.
    max_queue: requests admitted beyond the one generating; max_tokens: the most new tokens a
    request may ask (and what it gets when it asks none, within the context); max_prompt_tokens:
    None for the model's context. reuse=False prefills every prompt whole (for comparisons)."""

    model: str
    store: str
    hot: str | None = None
    warm: str | None = None
    block_tokens: int | None = None
    policy: str = "exact"
    budget_tokens: int | None = None
    max_queue: int = 16
    max_tokens: int = 1024
    max_prompt_tokens: int | None = None
    reuse: bool = True
    prefill_chunk: int = 1024
    dtype: str = "float32"
    name: str | None = None

    @property
    def served_name(self) -> str:
        """The model id clients send (``/v1/models``)."""
        return self.name or self.model.rstrip("/").rsplit("/", 1)[-1]


def load_model(spec: str, dtype: str):
    """``(model, tokenizer)``: the bundled SmolLM2 for ``smollm2``, else a local checkpoint
    folder (nothing is downloaded: ``local_files_only``)."""
    from tierstore.layout import dtype_from_name

    dt = dtype_from_name(dtype)
    if spec == "smollm2":
        from tierstore.adapters.models import load_smollm2
        return load_smollm2(dt)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=dt, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(spec, local_files_only=True)


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    reused_tokens: int


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # stop (EOS or a stop sequence), length, abort (client gone or draining)
    usage: Usage


class Job:
    """One request in the engine. Its events, in order, on the caller's event loop:
    ``("start", Started)``, ``("text", str)``..., ``("end", Finished)``; or ``("error", ApiError)``."""

    def __init__(self, chat: bool, prompt, sampling: Sampling, session: str | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.chat, self.prompt, self.sampling, self.session = chat, prompt, sampling, session
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.arrived = time.monotonic()
        self._loop = loop

    def emit(self, kind: str, value=None) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def cancel(self) -> None:
        """The client is gone: stop at the next token (or skip the job if it has not started)."""
        self.cancelled.set()


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")


class _Tracker(StoppingCriteria):
    """Called by ``generate`` after every new token: times it, hands the new text to the job
    (holding back what could still become a stop sequence), and stops the generation at a stop
    sequence, a cancelled job or a draining engine."""

    def __init__(self, engine: "Engine", job: Job, prompt_len: int) -> None:
        self.engine, self.job, self.prompt_len = engine, job, prompt_len
        self.stops = job.sampling.stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens, self.text, self.sent = 0, "", 0
        self.reason: str | None = None
        self.last = job.arrived

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        now = time.monotonic()
        self.engine.metrics.token(now - self.last, first=self.tokens == 0)
        self.tokens, self.last = self.tokens + 1, now
        self.text = self.engine.tok.decode(input_ids[0, self.prompt_len:].tolist(), skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=None)
        if cut is not None:
            self.text, self.reason = self.text[:cut], "stop"
        elif self.job.cancelled.is_set() or self.engine.draining.is_set():
            self.reason = "abort"
        self.flush(final=self.reason is not None)
        return torch.full((input_ids.shape[0],), self.reason is not None, dtype=torch.bool, device=input_ids.device)

    def flush(self, final: bool) -> None:
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        piece = self.text[self.sent:end]
        if piece and (final or not piece.endswith("\ufffd")):  # a partial UTF-8 character waits
            self.job.emit("text", piece)
            self.sent = end


class Engine:
    """The model, tokenizer and store behind one worker thread, with a bounded queue in front."""

    def __init__(self, cfg: EngineConfig) -> None:
        from .metrics import ServeMetrics

        self.cfg = cfg
        self.model = self.tok = self.store = None
        self.draining = threading.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tierstore-generate")
        self._lock = threading.Lock()
        self._admitted = 0      # waiting + running
        self._running = 0
        self._service_s = 1.0   # moving average of a request's time on the worker
        self._closed = False
        self.metrics = ServeMetrics(self)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Load the model and open the store on the worker thread (which uses them from then on)."""
        self._pool.submit(self._load).result()
        return self

    def _load(self) -> None:
        import tierstore

        self.model, self.tok = load_model(self.cfg.model, self.cfg.dtype)
        self.store = tierstore.open(self.cfg.store, hot=self.cfg.hot, warm=self.cfg.warm,
                                    block_tokens=self.cfg.block_tokens)
        cfg = self.model.config.get_text_config()
        self.context = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))
        self.vocab = cfg.vocab_size
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tok.eos_token_id
        self.eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self.pad = next((p for p in (gen.pad_token_id, self.tok.pad_token_id) if p is not None), self.eos[0])

    def drain(self) -> None:
        """Stop admitting; running jobs stop at their next token (and commit), waiting ones get 503."""
        self.draining.set()

    def close(self) -> None:
        """Drain, let the worker finish (every admitted job ends, committed), close the store."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.drain()
        self._pool.submit(self._close).result()
        self._pool.shutdown()

    def _close(self) -> None:
        if self.store is not None:
            self.store.close()

    # -- admission --------------------------------------------------------------------------------

    def queue_depth(self) -> int:
        """Admitted requests that wait for the worker."""
        return self._admitted - self._running

    def running(self) -> int:
        return self._running

    def submit(self, job: Job) -> None:
        """Admit ``job`` (ApiError 429 when ``max_queue`` requests already wait, 503 while draining)."""
        with self._lock:
            if self.draining.is_set():
                raise _shutting_down()
            if self._admitted >= self.cfg.max_queue + 1:
                retry = min(60, max(1, math.ceil(self._service_s * (self._admitted - self._running + 1))))
                raise ApiError(429, f"the server is busy: {self._admitted} requests are admitted "
                               f"(at most {self.cfg.max_queue} wait); retry after {retry} s",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)})
            self._admitted += 1
        try:
            self._pool.submit(self._run, job)
        except RuntimeError:  # the worker has shut down (a request racing the engine's close)
            with self._lock:
                self._admitted -= 1
            raise _shutting_down() from None

    # -- one request, on the worker -------------------------------------------------------------

    def _run(self, job: Job) -> None:
        t0 = time.monotonic()
        with self._lock:
            self._running += 1
        try:
            if job.cancelled.is_set():
                self.metrics.cancelled.inc()
                return
            if self.draining.is_set():
                raise _shutting_down()
            self._generate(job)
        except ApiError as e:
            job.emit("error", e)
        except (SessionBusyError, ModelMismatchError) as e:
            job.emit("error", ApiError(409, str(e), code="session_conflict", param="session"))
        except TierstoreError as e:
            log.exception("request failed in the store")
            job.emit("error", ApiError(500, f"{type(e).__name__}: {e}", type="server_error"))
        except Exception as e:  # noqa: BLE001 - the worker must outlive any one request
            log.exception("request failed")
            job.emit("error", ApiError(500, f"{type(e).__name__}: {e}", type="server_error"))
        finally:
            with self._lock:
                self._running -= 1
                self._admitted -= 1
                self._service_s = 0.8 * self._service_s + 0.2 * (time.monotonic() - t0)

    def _encode(self, job: Job) -> list[int]:
        """The prompt's token ids: chat messages through the chat template, else the text (or ids)."""
        if job.chat:
            if not getattr(self.tok, "chat_template", None):
                raise ApiError(400, f"model {self.cfg.served_name!r} has no chat template: use /v1/completions",
                               param="messages")
            text = self.tok.apply_chat_template(job.prompt, tokenize=False, add_generation_prompt=True)
            return list(self.tok(text, add_special_tokens=False).input_ids)
        if isinstance(job.prompt, str):
            return list(self.tok(job.prompt).input_ids)
        if any(not 0 <= t < self.vocab for t in job.prompt):
            raise ApiError(400, f"prompt: token ids must be in [0, {self.vocab})", param="prompt")
        return list(job.prompt)

    def _limit(self, job: Job, n: int) -> int:
        """New tokens this request may generate; 400 when the prompt (with them) does not fit."""
        param = "messages" if job.chat else "prompt"
        most = min(self.context, self.cfg.max_prompt_tokens or self.context)
        if n == 0:
            raise ApiError(400, f"{param}: the prompt is empty", param=param)
        if n > most or n >= self.context:
            raise ApiError(400, f"the prompt has {n} tokens; this server takes at most "
                           f"{min(most, self.context - 1)}", param=param, code="context_length_exceeded")
        want = job.sampling.max_tokens
        if want is not None and n + want > self.context:
            raise ApiError(400, f"the prompt ({n} tokens) and max_tokens ({want}) exceed the model's context "
                           f"of {self.context} tokens", param="max_tokens", code="context_length_exceeded")
        return min(want or self.cfg.max_tokens, self.context - n)

    def _generation_config(self, s: Sampling, limit: int) -> GenerationConfig:
        """Only what the request asks: the checkpoint's own sampling defaults do not leak in."""
        kw = dict(max_new_tokens=limit, eos_token_id=self.eos, pad_token_id=self.pad,
                  prefill_chunk_size=self.cfg.prefill_chunk)
        if s.temperature > 0:
            kw.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0)
        else:
            kw.update(do_sample=False)
        return GenerationConfig(**kw)

    def _generate(self, job: Job) -> None:
        from tierstore.adapters.prefix import resume_prefix

        ids = self._encode(job)
        limit = self._limit(job, len(ids))
        session = job.session or f"serve-{uuid.uuid4().hex[:16]}"  # named by the client, else new
        cache = resume_prefix(self.store, self.model, ids, session, reuse=self.cfg.reuse, policy=self.cfg.policy,
                              budget_tokens=self.cfg.budget_tokens, commit_on_close=False,
                              tokenizer_name=getattr(self.tok, "name_or_path", None))
        try:
            reused = cache.get_seq_length()
            self.metrics.prompt(len(ids), reused)
            job.emit("start", Started(len(ids), reused))
            tracker = _Tracker(self, job, len(ids))
            if job.sampling.seed is not None:
                torch.manual_seed(job.sampling.seed)
            full = torch.tensor([ids], dtype=torch.long)
            with torch.no_grad():
                out = self.model.generate(full, attention_mask=torch.ones_like(full), cache=cache,
                                          generation_config=self._generation_config(job.sampling, limit),
                                          stopping_criteria=StoppingCriteriaList([tracker]))
            cache.commit()  # prompt + reply (the last token is fed next turn): the next turn resumes it
        finally:
            cache.close()
        new = out[0, len(ids):].tolist()
        reason = tracker.reason or ("stop" if new and new[-1] in self.eos else "length")
        tracker.flush(final=True)
        if job.cancelled.is_set():
            self.metrics.cancelled.inc()
        self.metrics.completion_tokens.inc(len(new))
        job.emit("end", Finished(reason, Usage(len(ids), len(new), reused)))
