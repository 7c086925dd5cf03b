"""The generation engine: the model, its tokenizer and the store behind ``max_running`` worker
threads, with a bounded admission count in front.

A request runs on a worker as: render the messages with the chat template, resume the longest
stored prefix of its token ids (``adapters.prefix``), prefill the rest and generate, commit the
new state (so the next turn resumes it), close the cache. Requests on different workers run at
once, but the model computes for one of them at a time: every forward of a job needs the model's
*turn* (``Turns``), handed over at each token. Waiting turns go to prefills before decode steps,
then by arrival: a new request's time to first token is its own resume and prefill plus at most
one decode step of the others, not their whole replies (iteration-level scheduling, as serving
engines do, without batching the rows). A job holds the turn from its forward through the
sampling of its token, with its own random state swapped in, so a seeded request samples the
same tokens whoever runs beside it; resuming, committing and the store's I/O run outside the
turn, beside the others' forwards. The event loop only parses, waits and writes.

Beyond ``max_running`` jobs, ``max_queue`` may wait; a request beyond that is refused at once with
429 and a ``Retry-After`` estimated from recent service times, never queued without bound. A job
whose client went away (``Job.cancel``) stops at its next token; so does every job once the
engine drains (SIGTERM); both still commit what they hold.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import secrets
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
    max_running: requests generating at once (they take turns at the model, token by token);
    max_queue: requests admitted beyond those that run; max_tokens: the most new tokens a
    request may ask (and what it gets when it asks none, within the context); max_prompt_tokens:
    None for the model's context. reuse=False prefills every prompt whole (for comparisons).
    remote/host_id: ``tierstore.open``'s shared tier (None: ``TIERSTORE_REMOTE`` if set) and this
    host's id in it: servers on several hosts then resume each other's conversations."""

    model: str
    store: str
    hot: str | None = None
    warm: str | None = None
    block_tokens: int | None = None
    policy: str = "exact"
    budget_tokens: int | None = None
    max_queue: int = 16
    max_running: int = 4
    max_tokens: int = 1024
    max_prompt_tokens: int | None = None
    reuse: bool = True
    prefill_chunk: int = 1024
    dtype: str = "float32"
    name: str | None = None
    remote: str | None = None
    host_id: str | None = None

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
        self.order = 0       # arrival rank, set on admission (older jobs take the model's turn first)
        self.rng: torch.Tensor | None = None  # the job's own random state (a seeded request)
        self._loop = loop

    def emit(self, kind: str, value=None) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def cancel(self) -> None:
        """The client is gone: stop at the next token (or skip the job if it has not started)."""
        self.cancelled.set()


class Turns:
    """The model's turn: one job's forwards at a time, granted to the waiting job of highest
    priority (smallest ``(phase, arrival)``: a prefill before any decode step, then the older
    job). A job's own random state is swapped in while it holds the turn (sampling happens
    inside it), so interleaving never changes what a seeded job draws."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._waiting: list[tuple[int, int, int]] = []  # heap of (phase, arrival, ticket)
        self._tickets = itertools.count()
        self._holder: Job | None = None

    def acquire(self, job: "Job", prefill: bool) -> None:
        """Wait for the turn (no-op when ``job`` holds it already: chunked prefill)."""
        with self._cv:
            if self._holder is job:
                return
            me = (0 if prefill else 1, job.order, next(self._tickets))
            heapq.heappush(self._waiting, me)
            while self._holder is not None or self._waiting[0] != me:
                self._cv.wait()
            heapq.heappop(self._waiting)
            self._holder = job
        if job.rng is not None:
            torch.random.set_rng_state(job.rng)

    def release(self, job: "Job") -> None:
        """Give the turn up, if ``job`` holds it (its random state is kept for its next turn)."""
        with self._cv:
            if self._holder is not job:
                return
            if job.rng is not None:
                job.rng = torch.random.get_rng_state()
            self._holder = None
            self._cv.notify_all()

    def held_by(self, job: "Job") -> bool:
        return self._holder is job


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
        self.engine.turns.release(self.job)  # the token is sampled: another job's forward may run
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
    """The model, tokenizer and store behind ``max_running`` worker threads that take turns at
    the model, with a bounded queue in front."""

    def __init__(self, cfg: EngineConfig) -> None:
        from .metrics import ServeMetrics

        if cfg.max_running < 1 or cfg.max_queue < 0:
            raise ValueError(f"max_running must be >= 1 and max_queue >= 0, got {cfg.max_running}, {cfg.max_queue}")
        self.cfg = cfg
        self.model = self.tok = self.store = None
        self.draining = threading.Event()
        self.turns = Turns()
        self._pool = ThreadPoolExecutor(cfg.max_running, thread_name_prefix="tierstore-generate")
        self._lock = threading.Lock()
        self._admitted = 0      # waiting + running
        self._running = 0
        self._arrivals = itertools.count()
        self._service_s = 1.0   # moving average of a request's time on a worker
        self._closed = False
        self._job = threading.local()  # the job a worker thread runs (whose forwards need the turn)
        self._hooks: list = []
        self.metrics = ServeMetrics(self)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Load the model, open the store and make every forward of a job wait for its turn."""
        from tierstore.adapters.prefix import TailIndex

        self._load()
        self.tails = TailIndex().load(self.store)  # stored conversations, by where their tails start
        self._hooks = [self.model.register_forward_pre_hook(self._forward_starts, prepend=True)]
        return self

    def _forward_starts(self, module, args) -> None:
        job = getattr(self._job, "job", None)
        if job is not None:  # a worker's forward: a prefill (no token yet) or a decode step
            self.turns.acquire(job, prefill=self._job.tracker is None or self._job.tracker.tokens == 0)

    def _load(self) -> None:
        import tierstore

        self.model, self.tok = load_model(self.cfg.model, self.cfg.dtype)
        self.store = tierstore.open(self.cfg.store, hot=self.cfg.hot, warm=self.cfg.warm,
                                    block_tokens=self.cfg.block_tokens, remote=self.cfg.remote, host=self.cfg.host_id)
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
        """Drain, let the workers finish (every admitted job ends, committed), close the store."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.drain()
        self._pool.shutdown(wait=True)
        for h in self._hooks:
            h.remove()
        if self.store is not None:
            self.store.close()

    # -- admission --------------------------------------------------------------------------------

    def queue_depth(self) -> int:
        """Admitted requests that wait for a worker."""
        return self._admitted - self._running

    def running(self) -> int:
        """Admitted requests on a worker (at most ``max_running``)."""
        return self._running

    def submit(self, job: Job) -> None:
        """Admit ``job`` (ApiError 429 when ``max_queue`` requests already wait, 503 while draining)."""
        with self._lock:
            if self.draining.is_set():
                raise _shutting_down()
            if self._admitted >= self.cfg.max_queue + self.cfg.max_running:
                ahead = self._admitted - self._running + 1
                retry = min(60, max(1, math.ceil(self._service_s * ahead / self.cfg.max_running)))
                raise ApiError(429, f"the server is busy: {self._admitted} requests are admitted "
                               f"(at most {self.cfg.max_queue} wait); retry after {retry} s",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)})
            self._admitted += 1
            job.order = next(self._arrivals)
        try:
            self._pool.submit(self._run, job)
        except RuntimeError:  # the workers have shut down (a request racing the engine's close)
            with self._lock:
                self._admitted -= 1
            raise _shutting_down() from None

    # -- one request, on a worker --------------------------------------------------------------

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
            self._job.job, self._job.tracker = job, None
            self._generate(job)
        except ApiError as e:
            job.emit("error", e)
        except (SessionBusyError, ModelMismatchError) as e:
            job.emit("error", ApiError(409, str(e), code="session_conflict", param="session"))
        except TierstoreError as e:
            log.exception("request failed in the store")
            job.emit("error", ApiError(500, f"{type(e).__name__}: {e}", type="server_error"))
        except Exception as e:  # noqa: BLE001 - a worker must outlive any one request
            log.exception("request failed")
            job.emit("error", ApiError(500, f"{type(e).__name__}: {e}", type="server_error"))
        finally:
            self.turns.release(job)
            self._job.job = self._job.tracker = None
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
                              budget_tokens=self.cfg.budget_tokens, commit_on_close=False, tails=self.tails,
                              tokenizer_name=getattr(self.tok, "name_or_path", None))
        try:
            reused = cache.get_seq_length()
            self.metrics.prompt(len(ids), reused)
            job.emit("start", Started(len(ids), reused))
            tracker = self._job.tracker = _Tracker(self, job, len(ids))
            # its own random stream (seeded by the request, else fresh), swapped in with its turn
            seed = job.sampling.seed if job.sampling.seed is not None else secrets.randbits(63)
            job.rng = torch.Generator().manual_seed(seed).get_state()
            full = torch.tensor([ids], dtype=torch.long)
            try:
                with torch.no_grad():
                    out = self.model.generate(full, attention_mask=torch.ones_like(full), cache=cache,
                                              generation_config=self._generation_config(job.sampling, limit),
                                              stopping_criteria=StoppingCriteriaList([tracker]))
            finally:
                self.turns.release(job)
            for rec in cache.commit():  # prompt + reply (the last token is fed next turn): the next turn resumes it
                self.tails.add(rec)
        finally:
            # unhooking the model while another job's forward runs could hand that forward a
            # half-removed hook: a cache closes within a turn (a short one: its KV is committed)
            self.turns.acquire(job, prefill=True)
            try:
                cache.close()
            finally:
                self.turns.release(job)
        new = out[0, len(ids):].tolist()
        reason = tracker.reason or ("stop" if new and new[-1] in self.eos else "length")
        tracker.flush(final=True)
        if job.cancelled.is_set():
            self.metrics.cancelled.inc()
        self.metrics.completion_tokens.inc(len(new))
        job.emit("end", Finished(reason, Usage(len(ids), len(new), reused)))
