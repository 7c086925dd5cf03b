"""`tierstore serve` end to end: the real server in a child process on a loopback port, a tiny
random checkpoint saved to disk, a real store, and the real ``openai`` client (plain HTTP for the
error cases and the raw event stream). Greedy replies are compared with ``model.generate`` over a
``DynamicCache`` in this process; reuse is read from ``/metrics``."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")  # the serve extra (`make test` installs it with the test extra)
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import tierstore  # noqa: E402
from tierstore.maintenance.verify import verify_store  # noqa: E402
from tierstore.tools.serve.process import ServerProcess  # noqa: E402

from support.models import save_tiny_checkpoint  # noqa: E402

BT = 16                      # block tokens: short chats still fill blocks
MODEL = "tiny"               # the checkpoint folder's name is the served model id
LONG = 800                   # max_tokens of generations a test interrupts (the tiny model rarely stops)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / MODEL)


@pytest.fixture(scope="module")
def cold(checkpoint):
    """The checkpoint loaded here, for cold runs to compare with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)


def start(checkpoint, store, log, *extra) -> ServerProcess:
    return ServerProcess(["--model", checkpoint, "--store", str(store), "--block-tokens", str(BT), "--hot", "8MiB",
                          "--warm", "16MiB", "--max-tokens", "900", "--max-prompt-tokens", "600", *extra], log).start()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """One server for the module, one request generating and no waiting room (--max-running 1
    --max-queue 0): a second concurrent request is refused with 429."""
    d = tmp_path_factory.mktemp("serve")
    srv = start(checkpoint, d / "kv", d / "log", "--max-queue", "0", "--max-running", "1")
    srv.store = d / "kv"
    yield srv
    try:
        assert srv.stop() == 0, srv.tail()
    finally:
        srv.kill()
    with tierstore.open(srv.store) as store:  # whatever the tests did, the store is whole
        assert verify_store(store, ()).ok


def client(srv) -> "openai.OpenAI":
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metrics(srv) -> dict:
    """``{(sample name, ((label, value), ...)): value}`` of ``/metrics``."""
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def prompt_ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


def cold_greedy(cold, ids: list[int], max_tokens: int) -> tuple[str, bool]:
    """``model.generate`` greedy over a DynamicCache: (reply text, stopped at EOS)."""
    from transformers import DynamicCache
    model, tok = cold
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), cache=DynamicCache(), do_sample=False,
                             max_new_tokens=max_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, len(ids):].tolist()
    return tok.decode(new, skip_special_tokens=True), bool(new) and new[-1] == tok.eos_token_id


def chat(srv, messages, **kw):
    return client(srv).chat.completions.create(model=MODEL, messages=messages, **{"temperature": 0, **kw})


def post(srv, path: str, body=None, **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, **{"timeout": 60, **kw})


def assert_error(r: httpx.Response, status: int, param=None, code=None, kind="invalid_request_error") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["type"], err["param"]) == (kind, param), err
    if code is not None:
        assert err["code"] == code, err
    return err


def wait_idle(srv, timeout: float = 30) -> dict:
    """/metrics once nothing runs or waits (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(srv)
        if metric(m, "tierstore_requests_running") == metric(m, "tierstore_queue_depth") == 0:
            return m
        assert time.monotonic() < deadline, "the server did not go idle"
        time.sleep(0.05)


def open_stream(srv, messages, max_tokens: int = LONG, session: str | None = None):
    """A raw streaming chat request: (client, response, line iterator); the caller closes it."""
    c = httpx.Client(timeout=60)
    headers = {"X-Tierstore-Session": session} if session else {}
    req = c.build_request("POST", srv.url + "/v1/chat/completions", headers=headers,
                          json={"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                                "stream": True})
    r = c.send(req, stream=True)
    assert r.status_code == 200
    return c, r, r.iter_lines()


def next_content(lines) -> str:
    """The next chunk's content (skipping the role chunk)."""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                return delta["content"]
    raise AssertionError("the stream ended")


# -- one server --------------------------------------------------------------------------------


def test_health_models_and_metric_names(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client(server).models.list().data] == [MODEL]
    m = metrics(server)
    names = {name for name, _ in m}
    for name in ("tierstore_requests_total", "tierstore_prompt_tokens_total", "tierstore_prompt_tokens_reused_total",
                 "tierstore_prompt_tokens_prefilled_total", "tierstore_prefix_hit_ratio",
                 "tierstore_time_to_first_token_seconds_count", "tierstore_time_per_output_token_seconds_count",
                 "tierstore_queue_depth", "tierstore_memory_fragmentation_ratio", "tierstore_promotions_total",
                 "tierstore_demotions_total", "tierstore_completion_tokens_total"):
        assert name in names, name
    for tier in ("hot", "warm", "cold"):
        assert ("tierstore_tier_used_bytes", (("tier", tier),)) in m
    # the budgets are the store's own (--hot 8MiB --warm 16MiB), not made up here
    assert metric(m, "tierstore_tier_budget_bytes", tier="hot") == 8 << 20
    assert metric(m, "tierstore_tier_budget_bytes", tier="warm") == 16 << 20


def test_chat_matches_cold_greedy_and_the_second_turn_reuses_the_first(server, cold):
    tok = cold[1]
    turn1 = [{"role": "system", "content": "You are a tiny model."},
             {"role": "user", "content": "Please tell me about tiered caches."}]
    before = metrics(server)
    r1 = chat(server, turn1, max_tokens=24)
    ids1 = prompt_ids(tok, turn1)
    text1, eos1 = cold_greedy(cold, ids1, 24)
    assert r1.choices[0].message.content == text1 and r1.choices[0].message.role == "assistant"
    assert r1.choices[0].finish_reason == ("stop" if eos1 else "length")
    assert (r1.usage.prompt_tokens, r1.usage.prompt_tokens_details.cached_tokens) == (len(ids1), 0)
    mid = metrics(server)
    assert metric(mid, "tierstore_prompt_tokens_total") - metric(before, "tierstore_prompt_tokens_total") == len(ids1)
    assert metric(mid, "tierstore_prompt_tokens_reused_total") == metric(before, "tierstore_prompt_tokens_reused_total")

    turn2 = turn1 + [{"role": "assistant", "content": text1}, {"role": "user", "content": "And then?"}]
    r2 = chat(server, turn2, max_tokens=24)
    ids2 = prompt_ids(tok, turn2)
    assert r2.choices[0].message.content == cold_greedy(cold, ids2, 24)[0]   # resumed = cold, token for token
    reused = r2.usage.prompt_tokens_details.cached_tokens
    assert r2.usage.prompt_tokens == len(ids2) and len(ids1) // BT * BT <= reused < len(ids2)
    after = metrics(server)
    assert metric(after, "tierstore_prompt_tokens_total") - metric(mid, "tierstore_prompt_tokens_total") == len(ids2)
    assert metric(after, "tierstore_prompt_tokens_reused_total") - metric(mid, "tierstore_prompt_tokens_reused_total") \
        == reused
    assert metric(after, "tierstore_prompt_tokens_prefilled_total") \
        - metric(mid, "tierstore_prompt_tokens_prefilled_total") == len(ids2) - reused
    assert metric(after, "tierstore_prefix_hits_total") == metric(mid, "tierstore_prefix_hits_total") + 1
    assert 0 < metric(after, "tierstore_prefix_hit_ratio") < 1
    assert metric(after, "tierstore_time_to_first_token_seconds_count") \
        == metric(before, "tierstore_time_to_first_token_seconds_count") + 2


def test_streaming_sends_openai_chunks_ending_with_done(server):
    messages = [{"role": "user", "content": "Stream me some characters."}]
    whole = chat(server, messages, max_tokens=20).choices[0].message.content
    chunks = list(chat(server, messages, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # resumed
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1

    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": messages, "max_tokens": 5, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)
    assert all(json.loads(x[6:])["object"] == "chat.completion.chunk" for x in lines[:-1])


def test_completions_endpoint_plain_and_streamed(server, cold):
    tok = cold[1]
    prompt = "Once upon a time, in a tiered cache,"
    r = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == cold_greedy(cold, tok(prompt).input_ids, 16)[0]
    streamed = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    by_ids = client(server).completions.create(model=MODEL, prompt=tok(prompt).input_ids, max_tokens=16,
                                               temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text


def test_sampling_honours_seed_stop_and_max_tokens(server):
    messages = [{"role": "user", "content": "Sample something for me."}]
    a, b, c = (chat(server, messages, max_tokens=24, temperature=1.0, top_p=0.9, seed=s).choices[0].message.content
               for s in (7, 7, 8))
    assert a == b and a != c
    greedy = chat(server, messages, max_tokens=24).choices[0].message.content
    assert len(greedy) >= 8
    stop = greedy[6:8]
    cut = chat(server, messages, max_tokens=24, stop=[stop, "never-there"]).choices[0]
    assert cut.message.content == greedy[:greedy.find(stop)] and cut.finish_reason == "stop"
    short = chat(server, messages, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_errors_are_openai_shaped(server):
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    chat_path = "/v1/chat/completions"
    assert_error(post(server, chat_path, content=b'{"model": "tiny", "messages": [', headers={
        "content-type": "application/json"}), 400, code="invalid_json")
    assert_error(post(server, chat_path, [1, 2]), 400)
    assert_error(post(server, chat_path, {**ok, "model": "gpt-4"}), 404, param="model", code="model_not_found")
    assert_error(post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, param="model")
    assert_error(post(server, chat_path, {**ok, "messages": [{"role": "user", "content": "x" * 700}]}), 400,
                 param="messages", code="context_length_exceeded")
    for bad in (0, -1, "many", 1.5):
        assert_error(post(server, chat_path, {**ok, "max_tokens": bad}), 400, param="max_tokens")
    assert_error(post(server, chat_path, {**ok, "max_tokens": 901}), 400, param="max_tokens",
                 code="max_tokens_exceeded")
    assert_error(post(server, chat_path, {**ok, "messages": [{"role": "user", "content": "x" * 500}],
                                          "max_tokens": 900}), 400, param="max_tokens",
                 code="context_length_exceeded")
    assert_error(post(server, chat_path, {k: v for k, v in ok.items() if k != "messages"}), 400, param="messages")
    assert_error(post(server, chat_path, {**ok, "temperature": 3}), 400, param="temperature")
    assert_error(post(server, chat_path, {**ok, "n": 2}), 400, param="n", code="unsupported_parameter")
    assert_error(post(server, chat_path, ok, headers={"X-Tierstore-Session": "../etc"}), 400,
                 param="X-Tierstore-Session")
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    with pytest.raises(openai.BadRequestError) as e:                    # the real client sees them too
        chat(server, [{"role": "user", "content": "x" * 700}])
    assert e.value.code == "context_length_exceeded"
    assert post(server, chat_path, ok).status_code == 200               # and the server goes on
    counted = metrics(server)
    assert metric(counted, "tierstore_requests_total", endpoint=chat_path, code="400") >= 12


def test_overload_gets_429_and_a_client_gone_mid_stream_frees_its_slot(server):
    before = wait_idle(server)
    c, r, lines = open_stream(server, [{"role": "user", "content": "abc"}])
    try:
        next_content(lines)                                              # it generates now
        busy = post(server, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "me too"}]})
        assert_error(busy, 429, kind="rate_limit_error", code="queue_full")
        assert int(busy.headers["Retry-After"]) >= 1
        with pytest.raises(openai.RateLimitError):
            chat(server, [{"role": "user", "content": "and me"}], max_tokens=2)
    finally:
        r.close()                                                        # the client goes away mid-stream
        c.close()
    after = wait_idle(server)
    assert metric(after, "tierstore_requests_cancelled_total") == metric(before, "tierstore_requests_cancelled_total") + 1
    generated = metric(after, "tierstore_completion_tokens_total") - metric(before, "tierstore_completion_tokens_total")
    assert 0 < generated < LONG                                          # stopped, not run to the end
    assert metric(after, "tierstore_requests_total", endpoint="/v1/chat/completions", code="429") \
        == metric(before, "tierstore_requests_total", endpoint="/v1/chat/completions", code="429") + 2
    assert chat(server, [{"role": "user", "content": "abc"}], max_tokens=4).usage.completion_tokens == 4


# -- restarts, SIGTERM, concurrency --------------------------------------------------------------


def test_sigterm_commits_in_flight_and_a_restart_resumes_from_disk(checkpoint, cold, tmp_path):
    tok = cold[1]
    store = tmp_path / "kv"
    first = [{"role": "user", "content": "abc, remember this conversation across a restart."}]
    srv = start(checkpoint, store, tmp_path / "log1")
    try:
        c, r, lines = open_stream(srv, first, session="chat-1")
        got = "".join(next_content(lines) for _ in range(5))
        srv.proc.send_signal(signal.SIGTERM)                             # mid-stream
        rest = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        r.close()
        c.close()
        assert rest[-1]["choices"][0]["finish_reason"] == "abort"        # stopped early, answered in full
        got += "".join(ch["choices"][0]["delta"].get("content") or "" for ch in rest)
        assert srv.proc.wait(60) == 0, srv.tail()
    finally:
        srv.kill()
    ids1 = prompt_ids(tok, first)
    with tierstore.open(store) as s:                                      # what was in flight is committed
        rec = s.session("chat-1")
        assert len(ids1) + len(got) - 1 <= rec.length < len(ids1) + LONG
        assert rec.token_ids[:len(ids1)].tolist() == ids1 and verify_store(s, ()).ok

    second = first + [{"role": "assistant", "content": got}, {"role": "user", "content": "What did I say?"}]
    srv = start(checkpoint, store, tmp_path / "log2", "--max-queue", "4", "--max-running", "1")
    try:
        r2 = client(srv).chat.completions.create(model=MODEL, messages=second, max_tokens=12, temperature=0,
                                                 user="chat-1")
        ids2 = prompt_ids(tok, second)
        assert r2.choices[0].message.content == cold_greedy(cold, ids2, 12)[0]
        reused = r2.usage.prompt_tokens_details.cached_tokens
        assert len(ids1) // BT * BT <= reused < len(ids2) and reused > 0  # the stored history, read from disk
        m = metrics(srv)
        assert metric(m, "tierstore_prompt_tokens_reused_total") == reused
        assert metric(m, "tierstore_promotions_total", tier="cold") > 0  # its blocks came up from LMDB

        # many clients at once: all answered, each exactly as alone
        asks = [[{"role": "user", "content": f"Concurrent question number {i}?"}] for i in range(3)]
        out: dict[int, str] = {}

        def ask(i: int) -> None:
            out[i] = client(srv).chat.completions.create(model=MODEL, messages=asks[i], max_tokens=10,
                                                         temperature=0).choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert out == {i: cold_greedy(cold, prompt_ids(tok, asks[i]), 10)[0] for i in range(3)}

        # a client that gives up while its request waits: the job is skipped, never run
        before = wait_idle(srv)
        c, r, lines = open_stream(srv, [{"role": "user", "content": "abc"}], max_tokens=900)
        try:
            next_content(lines)
            with pytest.raises(httpx.ReadTimeout):
                post(srv, "/v1/completions", {"model": MODEL, "prompt": "q", "max_tokens": 2}, timeout=0.5)
            deadline = time.monotonic() + 10                              # the server notices (499)...
            while not metric(metrics(srv), "tierstore_requests_total", endpoint="/v1/completions", code="499"):
                assert time.monotonic() < deadline, "the waiting request's disconnect went unnoticed"
                time.sleep(0.05)
            assert metric(metrics(srv), "tierstore_requests_running") == 1   # ...while the stream still runs
        finally:
            r.close()
            c.close()
        after = wait_idle(srv)
        assert metric(after, "tierstore_generations_total") == metric(before, "tierstore_generations_total") + 1
        assert metric(after, "tierstore_requests_cancelled_total") \
            == metric(before, "tierstore_requests_cancelled_total") + 2
        assert srv.stop() == 0, srv.tail()
    finally:
        srv.kill()


def test_running_requests_take_turns_token_by_token(checkpoint, cold, tmp_path):
    """--max-running 2: a request that arrives while another streams a long reply is answered
    before that reply ends (its prefill takes the model's next turn), greedy exactly as alone,
    and a seeded sample draws what it draws alone; a third is refused (no waiting room)."""
    tok = cold[1]
    srv = start(checkpoint, tmp_path / "kv", tmp_path / "log", "--max-running", "2", "--max-queue", "0")
    try:
        seeded = [{"role": "user", "content": "Pick some words at random."}]
        alone = chat(srv, seeded, max_tokens=12, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
        ask = [{"role": "user", "content": "A short question, asked beside a long answer?"}]
        c, r, lines = open_stream(srv, [{"role": "user", "content": "abc"}])
        try:
            next_content(lines)                                          # the long reply generates
            t0 = time.monotonic()
            got = chat(srv, ask, max_tokens=10).choices[0].message.content
            beside = chat(srv, seeded, max_tokens=12, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
            m = metrics(srv)
            assert metric(m, "tierstore_requests_running") == 1, "the long reply should still be generating"
            assert got == cold_greedy(cold, prompt_ids(tok, ask), 10)[0]
            assert beside == alone                                       # its own random stream
            assert time.monotonic() - t0 < 60
            r2 = post(srv, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": ask})
            assert r2.status_code == 200                                 # two may run: the stream and this
            c3, s3, l3 = open_stream(srv, ask)
            try:
                next_content(l3)
                assert_error(post(srv, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": ask}),
                             429, kind="rate_limit_error", code="queue_full")
            finally:
                s3.close()
                c3.close()
        finally:
            r.close()
            c.close()
        after = wait_idle(srv)
        assert metric(after, "tierstore_requests_cancelled_total") == 2  # both streams stopped when left
        assert srv.stop() == 0, srv.tail()
    finally:
        srv.kill()
    with tierstore.open(tmp_path / "kv") as store:
        assert verify_store(store, ()).ok


def test_two_servers_on_one_redis_share_conversations(checkpoint, cold, tmp_path):
    """Hosts A and B (own stores) on one real redis-server: a chat's second turn sent to B,
    with no session id, resumes the first turn's prefix that A committed (pulled from Redis),
    and B's reply equals a cold run."""
    from support.redis_servers import SKIP_REASON, RedisNode, redis_binaries
    if redis_binaries() is None:
        pytest.skip(SKIP_REASON)
    pytest.importorskip("redis")
    tok = cold[1]
    node = RedisNode(tmp_path / "redis").start()
    a = b = None
    try:
        a = start(checkpoint, tmp_path / "a", tmp_path / "log-a", "--remote", node.url, "--host-id", "A")
        b = start(checkpoint, tmp_path / "b", tmp_path / "log-b", "--remote", node.url, "--host-id", "B")
        turn1 = [{"role": "user", "content": "Two hosts, one conversation: please remember it well."}]
        text1 = chat(a, turn1, max_tokens=16).choices[0].message.content
        turn2 = turn1 + [{"role": "assistant", "content": text1}, {"role": "user", "content": "And on host B?"}]
        r2 = chat(b, turn2, max_tokens=16)
        ids1, ids2 = prompt_ids(tok, turn1), prompt_ids(tok, turn2)
        assert r2.choices[0].message.content == cold_greedy(cold, ids2, 16)[0]
        reused = r2.usage.prompt_tokens_details.cached_tokens
        assert len(ids1) // BT * BT <= reused < len(ids2)              # A's blocks, through Redis
        assert metric(metrics(b), "tierstore_prompt_tokens_reused_total") == reused
        for srv in (a, b):
            assert srv.stop() == 0, srv.tail()
    finally:
        for srv in (a, b):
            if srv is not None:
                srv.kill()
        node.stop()
    with tierstore.open(tmp_path / "b", remote=False) as store:        # B holds the pulled blocks itself
        assert verify_store(store, ()).ok and store.list()
