"""`kiln serve` through the official `openai` client and raw HTTP: every endpoint, the sampling and log-probability
options, and every kind of bad request answered as OpenAI answers it while the server keeps serving."""

import threading
import time

import httpx
import pytest
import torch

from kiln.infer.engine import Engine
from kiln.infer.sampling import SamplingParams
from servekit import Server, make_run

openai = pytest.importorskip("openai")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve"), max_seq_len=2048)


@pytest.fixture(scope="module")
def srv(run):
    with Server(run, max_batch=4, max_len=96) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=30)


def engine_greedy(srv, ids, max_tokens):
    """The engine's own greedy tokens for `ids` (a second engine on the same weights, stepped here)."""
    tok = srv.served.tokenizer
    engine = Engine(srv.engine.model, tok, max_slots=1, max_len=96)
    out = engine.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0, stop_ids=tok.stop_ids))
    return out[0][0]


def test_models_health_and_page(srv, client):
    assert [m.id for m in client.models.list().data] == ["run"]
    assert client.models.retrieve("run").id == "run"
    assert httpx.get(srv.base + "/health").json()["status"] == "ok"
    page = httpx.get(srv.base + "/")
    assert page.status_code == 200 and "<script>" in page.text and "http" not in page.text.split("<script>")[0].lower()


def test_completion_greedy_equals_engine(srv, client):
    tok = srv.served.tokenizer
    prompt = "The capital of France is"
    ids = tok.encode(prompt, add_bos=tok.add_bos_token)
    want = engine_greedy(srv, ids, 12)
    r = client.completions.create(model="run", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == tok.decode(want, skip_special=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    assert r.choices[0].finish_reason == ("length" if len(want) == 12 else "stop")
    # The same prompt as token ids, and two prompts in one request.
    r2 = client.completions.create(model="run", prompt=[ids, ids[:3]], max_tokens=12, temperature=0)
    assert [c.index for c in r2.choices] == [0, 1] and r2.choices[0].text == r.choices[0].text


def test_chat_and_streaming_chat_equal_engine(srv, client):
    tok = srv.served.tokenizer
    want = tok.decode(engine_greedy(srv, tok.encode_chat(CHAT, add_generation_prompt=True), 20), skip_special=True)
    assert want   # the random model's reply has text
    r = client.chat.completions.create(model="run", messages=CHAT, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="run", messages=CHAT, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_next_chat_turn_reuses_the_conversation_so_far(srv, client):
    """The prefix cache: a conversation's next turn computes only what is new since the last (counted in
    /metrics), and answers as a cold engine does."""
    tok = srv.served.tokenizer
    turn = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    first = client.chat.completions.create(model="run", messages=turn, max_tokens=4, temperature=0)
    before = srv.metric("kiln_prompt_tokens_cached")
    turn += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "More"}]
    assert len(tok.encode_chat(turn, add_generation_prompt=True)) + 4 <= 96   # the server's context
    second = client.chat.completions.create(model="run", messages=turn, max_tokens=4, temperature=0)
    assert srv.metric("kiln_prompt_tokens_cached") - before >= Engine.min_prefix_tokens
    want = tok.decode(engine_greedy(srv, tok.encode_chat(turn, add_generation_prompt=True), 4), skip_special=True)
    assert second.choices[0].message.content == want


def test_sse_ends_with_done(srv):
    body = {"messages": CHAT, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", srv.url + "/chat/completions", json=body, timeout=30) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_logprobs_with_top_alternatives_and_echo(srv, client):
    tok, model = srv.served.tokenizer, srv.engine.model
    prompt = "Hello, how are you"
    ids = tok.encode(prompt, add_bos=tok.add_bos_token)
    r = client.completions.create(model="run", prompt=prompt, max_tokens=4, temperature=0, logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(ids) + r.usage.completion_tokens
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:len(ids)]), want, atol=1e-4)
    for i in range(1, len(ids)):          # the top alternatives: the model's 3 most likely, most likely first
        top = lp.top_logprobs[i]
        assert len(top) <= 3 and max(top.values()) == pytest.approx(ref[i - 1].max().item(), abs=1e-4)
    # lm-eval's log-likelihood request: token ids, echo, max_tokens 0 -> the prompt's log-probabilities only.
    r0 = client.completions.create(model="run", prompt=ids, max_tokens=0, logprobs=1, echo=True, temperature=0)
    assert r0.usage.completion_tokens == 0 and len(r0.choices[0].logprobs.token_logprobs) == len(ids)
    assert r0.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:len(ids)], abs=1e-5)
    # Chat: the chosen token's log-probability and its top alternatives.
    c = client.chat.completions.create(model="run", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    for e in content:   # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 2 and e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob and e.bytes is not None


def test_n_samples_and_seed(client):
    r = client.chat.completions.create(model="run", messages=CHAT, max_tokens=12, temperature=1.0, n=3, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1
    again = client.chat.completions.create(model="run", messages=CHAT, max_tokens=12, temperature=1.0, n=3, seed=5)
    assert [c.message.content for c in again.choices] == texts
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) if c.logprobs else 0 for c in r.choices) or \
        r.usage.prompt_tokens > 0
    greedy = client.completions.create(model="run", prompt="Hello", max_tokens=8, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text
    stream = list(client.completions.create(model="run", prompt="Hello", max_tokens=8, temperature=0.9, n=2,
                                            stream=True))
    assert {c.choices[0].index for c in stream} == {0, 1}


def test_stop_sequences(client):
    full = client.completions.create(model="run", prompt="Numbers:", max_tokens=30, temperature=0).choices[0].text
    assert len(full) > 8
    stop = full[4:6]
    cut = full[:full.find(stop)]
    for stream in (False, True):
        r = client.completions.create(model="run", prompt="Numbers:", max_tokens=30, temperature=0, stop=[stop, "@@@"],
                                      stream=stream)
        if stream:
            chunks = list(r)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (cut, "stop")


# ---------------------------------------------------------------- bad requests

def post(srv, path, body=None, content=None, **kw):
    return httpx.post(srv.url + path, json=body, content=content, timeout=30, **kw)


def assert_error(r, status, param=None, code=None, says=""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and says in err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def test_logit_bias_forces_and_bans_tokens(srv, client):
    """+100 on one token: greedy and sampled answers are that token only, in completions and chat; -100 on
    greedy's first choice: the answer is the engine's own greedy answer under the same bias, without it."""
    tok = srv.served.tokenizer
    prompt = "The capital of France is"
    ids = tok.encode(prompt, add_bos=tok.add_bos_token)
    forced = tok.encode(" Paris")[0]
    for temperature in (0, 1.0):
        r = client.completions.create(model="run", prompt=prompt, max_tokens=6, temperature=temperature, seed=1,
                                      logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
        assert r.choices[0].text == tok.decode([forced] * 6)
    chat = client.chat.completions.create(model="run", messages=CHAT, max_tokens=4, temperature=0,
                                          logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == tok.decode([forced] * 4)
    banned = engine_greedy(srv, ids, 1)[0]
    engine = Engine(srv.engine.model, tok, max_slots=1, max_len=96)
    want = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0, logit_bias={banned: -100.0},
                                                 stop_ids=tok.stop_ids))[0][0]
    r = client.completions.create(model="run", prompt=[ids], max_tokens=8, temperature=0,
                                  logit_bias={str(banned): -100})
    assert banned not in want and r.choices[0].text == tok.decode(want, skip_special=True)


def test_bad_requests_get_openai_errors_and_the_server_goes_on(srv, client):
    ok = {"model": "run", "prompt": "Hi", "max_tokens": 3}
    too_long = list(range(20, 120))                      # 100 tokens, context 96
    cases = [
        (dict(content=b'{"model": "run", "prompt": '), 400, None, None, "parse the JSON"),
        (dict(body={**ok, "model": "gpt-9"}), 404, "model", "model_not_found", "gpt-9"),
        (dict(body={**ok, "max_tokens": -5}), 400, "max_tokens", "integer_below_min_value", ">= 1"),
        (dict(body={**ok, "prompt": too_long}), 400, "prompt", "context_length_exceeded", "maximum context length"),
        (dict(body={**ok, "max_tokens": 95, "prompt": list(range(20, 30))}), 400, "max_tokens",
         "context_length_exceeded", "10 in the prompt"),
        (dict(body={**ok, "frobnicate": 1}), 400, "frobnicate", None, "Unrecognized request argument"),
        (dict(body={**ok, "temperature": "hot"}), 400, "temperature", "invalid_type", "decimal"),
        (dict(body={**ok, "n": 99}), 400, "n", None, "<= 4"),
        (dict(body={**ok, "logit_bias": {"five": 10}}), 400, "logit_bias", "invalid_value", "'five'"),
        (dict(body={**ok, "logit_bias": {"5": 101}}), 400, "logit_bias", "invalid_value", "-100 to 100"),
        (dict(body={**ok, "logit_bias": {"99999999": 1}}), 400, "logit_bias", "invalid_value", "not a token id"),
        (dict(body={**ok, "logit_bias": [5]}), 400, "logit_bias", "invalid_type", "object"),
        (dict(body={**ok, "suffix": "x"}), 400, "suffix", "unsupported_parameter", ""),
        (dict(body=[1, 2]), 400, None, None, "JSON object"),
        (dict(body={"model": "run"}), 400, "prompt", None, "prompt"),
    ]
    # A stream runs beside the bad requests and still gets every token.
    beside = client.completions.create(model="run", prompt="Hi", max_tokens=80, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    first = next(iter(beside))
    for kw, status, param, code, says in cases:
        assert_error(post(srv, "/completions", **kw), status, param, code, says)
        assert client.completions.create(model="run", prompt="Hi", max_tokens=2).choices[0].text is not None
    assert first.choices and list(beside)[-1].usage.completion_tokens == 80
    chat_cases = [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ]
    for body, param in chat_cases:
        assert_error(post(srv, "/chat/completions", body), 400, param)
    assert_error(httpx.get(srv.url + "/nope"), 404, says="Invalid URL")
    big = post(srv, "/completions", content=b'{"prompt": "' + b"a" * 5_000_000 + b'"}')
    assert_error(big, 413, code="request_too_large")
    with pytest.raises(openai.BadRequestError) as e:     # the client reads the shape too
        client.completions.create(model="run", prompt="Hi", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CHAT)
    assert httpx.get(srv.base + "/health").json()["status"] == "ok"


def test_api_key(run):
    with Server(run, max_batch=2, max_len=96, api_key="sk-right-key-123") as srv:
        good = openai.OpenAI(base_url=srv.url, api_key="sk-right-key-123", max_retries=0)
        assert good.completions.create(model="run", prompt="Hi", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=srv.url, api_key="sk-wrong-key-456", max_retries=0).models.list()
        assert e.value.body["code"] == "invalid_api_key" and "right" not in str(e.value)
        assert_error(httpx.post(srv.url + "/completions", json={"prompt": "x"}), 401, code="missing_api_key")
        assert httpx.get(srv.base + "/health").status_code == 200      # health and the page stay open
        assert good.models.list().data[0].id == "run"
        srv.engine.stop()                       # /health tells a stopped engine
        assert not srv.engine.alive
        assert_error(httpx.get(srv.base + "/health"), 503, code="engine_down")


def test_full_queue_gets_503_and_a_disconnect_frees_the_slot(run):
    with Server(run, max_batch=1, max_queue=1) as srv:
        decode = srv.engine._launch_decode
        srv.engine._launch_decode = lambda: (time.sleep(0.01), decode())[1]   # a slow model: the hog outlasts the test
        hog = {"prompt": "Hi", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        waiting: dict = {}
        with httpx.stream("POST", srv.url + "/completions", json=hog, timeout=60) as r:
            lines = r.iter_lines()      # kept: a dropped iterator closes the connection
            next(lines)                 # running: the one slot is taken

            def queued():
                waiting["r"] = httpx.post(srv.url + "/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
            t = threading.Thread(target=queued)
            t.start()
            deadline = time.monotonic() + 10
            while srv.engine.waiting < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            full = httpx.post(srv.url + "/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
            err = assert_error(full, 503, code="overloaded")
            assert err["type"] == "server_error"
        # The streaming client went away mid-stream: its slot goes to the queued request, which completes.
        t.join(timeout=30)
        assert waiting["r"].status_code == 200 and waiting["r"].json()["choices"][0]["text"] is not None
        deadline = time.monotonic() + 10
        while srv.metric("kiln_active_slots") or srv.metric("kiln_active_requests"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for status in ("200", "499", "503"):   # answered, disconnected, refused
            assert srv.metric("kiln_requests_total", endpoint="/v1/completions", status=status) == 1


def test_lora_adapters_by_model_name(run, tmp_path):
    """serve.lora_modules: each adapter is a model of /v1/models (its base as parent); a request naming one gets
    that adapter's tokens (those of the adapter merged into the base alone), one naming the base the base's,
    concurrent streams of both included; an unknown name is a 404 listing every name."""
    import concurrent.futures
    import copy
    from kiln.config import LoRAConfig
    from kiln.formats.peft import apply_adapter, write_adapter
    from kiln.infer.generate import generate
    from kiln.formats.checkpoint import latest_checkpoint, load_model
    base, _ = load_model(latest_checkpoint(run / "checkpoints"), "cpu", torch.float32)
    g = torch.Generator().manual_seed(5)
    dirs = {}
    for name, targets in (("terse", ("q_proj", "down_proj")), ("wordy", ("v_proj", "up_proj"))):
        tensors = {}
        for mod_name, mod in base.named_modules():
            if mod_name.rsplit(".", 1)[-1] in targets:
                tensors[f"{mod_name}.lora_A.weight"] = torch.randn(4, mod.in_features, generator=g) * 0.5
                tensors[f"{mod_name}.lora_B.weight"] = torch.randn(mod.out_features, 4, generator=g) * 0.5
        dirs[name] = write_adapter(tmp_path / name, tensors, LoRAConfig(enabled=True, rank=4, alpha=8,
                                                                       targets=list(targets)), str(run))
    with Server(run, max_batch=4, max_len=96, lora_modules=[f"{n}={d}" for n, d in dirs.items()]) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=30)
        cards = {m.id: m for m in client.models.list().data}
        assert list(cards) == ["run", "terse", "wordy"] and cards["terse"].model_extra["parent"] == "run"
        assert client.models.retrieve("wordy").id == "wordy"
        tok = srv.served.tokenizer
        prompt = "The capital of France is"
        ids = tok.encode(prompt, add_bos=tok.add_bos_token)
        want = {"run": generate(base, ids, 10, temperature=0, use_cache=False)}
        for name, d in dirs.items():
            merged = copy.deepcopy(base)
            apply_adapter(merged, d)
            want[name] = generate(merged, ids, 10, temperature=0, use_cache=False)
        assert len({tuple(w) for w in want.values()}) == 3, want

        def ask(name):
            chunks = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0, stream=True)
            return name, "".join(c.choices[0].text for c in chunks if c.choices)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            for name, text in pool.map(ask, ["run", "terse", "wordy"] * 2):
                assert text == tok.decode(want[name], skip_special=True), name
        r = client.completions.create(model="terse", prompt=prompt, max_tokens=10, temperature=0)
        assert r.model == "terse"
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="nope", prompt=prompt, max_tokens=2)
        assert "`run`, `terse`, `wordy`" in str(e.value)
