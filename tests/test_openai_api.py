"""The OpenAI-compatible API, end to end: the real app on 127.0.0.1 driven by the official `openai`
client (and raw HTTP where a client would never send such a request).

Two servers: `keyed` (an API key, sharing off: namespaces keep clients apart) and `shared` (open,
prefix cache shared, one batch row and one waiting place per model, plus a model that never stops
by itself, to make the scheduler busy and to cut streams short).
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from starlette.requests import Request
from test_e2e_api import free_port
from tiny_fixtures import bundled_checkpoint

from fm_demo import chat
from fm_demo.conversations.store import SessionStore
from fm_demo.models import ModelManager
from fm_demo.settings import Preset, Settings
from fm_demo.ui import build_demo, launch_kwargs, queue_kwargs
from fm_demo.ui.common import AppContext
from fm_demo.ui.openai_api import namespace
from fm_demo.ui.openai_schema import ApiRequest, parse_chat

KEY = "test-key"
N = 16  # default reply length of both servers
UPLOAD = 4000  # max_upload_chars of both servers
QUESTION = "What is the capital of France?"
PROMPTS = ["What is the capital of Italy?", "Spell cat.", "What is 12 plus 7?", "Reverse the word stone."]


def rambler_checkpoint(tmp_path_factory) -> str:
    """Random weights in the tiny base model's shape, with its tokenizer, whose end-of-text logit
    is always 0: greedy decoding never picks it, so a reply runs until max_tokens."""
    from transformers import AutoConfig, AutoTokenizer, FalconMambaForCausalLM

    src, out = Path(bundled_checkpoint("base")), tmp_path_factory.mktemp("rambler")
    torch.manual_seed(0)
    model = FalconMambaForCausalLM(AutoConfig.from_pretrained(src))
    eos = AutoTokenizer.from_pretrained(src).eos_token_id
    with torch.no_grad():
        model.get_output_embeddings().weight[eos] = 0
    model.save_pretrained(out)
    for f in src.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return str(out)


def context(settings: Settings, extra: dict[str, Preset] | None = None) -> AppContext:
    presets = dict(settings.presets())
    for key in ("tiny-base", "tiny-instruct"):
        presets[key] = dataclasses.replace(presets[key], source=bundled_checkpoint(key.split("-")[1]))
    manager = ModelManager(settings, presets={**presets, **(extra or {})})
    return AppContext(settings, manager, SessionStore(settings, manager))


def serve(settings: Settings, ctx: AppContext):
    demo = build_demo(settings, ctx).queue(**queue_kwargs(settings))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, **launch_kwargs(settings))
    return demo, url.rstrip("/")


@pytest.fixture(scope="module")
def keyed():
    settings = Settings(device="cpu", max_new_tokens=N, max_upload_chars=UPLOAD, api_key=KEY)
    ctx = context(settings)
    demo, url = serve(settings, ctx)
    yield url, ctx
    demo.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    settings = Settings(device="cpu", max_new_tokens=N, max_upload_chars=UPLOAD, share_prefix_cache=True,
                        max_batch=1, max_new_tokens_cap=100_000)
    path = rambler_checkpoint(tmp_path_factory)
    rambler = Preset("rambler", "random weights that never stop", path, "base", ("fp32",), "fp32")
    ctx = context(settings, {"rambler": rambler})
    demo, url = serve(settings, ctx)
    yield url, ctx
    demo.close()


def client(url: str, key: str = KEY, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120, **kw)


def ask(c: openai.OpenAI, content: str = QUESTION, **kw):
    kw.setdefault("model", "tiny-instruct")
    kw.setdefault("temperature", 0)
    return c.chat.completions.create(messages=[{"role": "user", "content": content}], **kw)


# -- models and chat ---------------------------------------------------------------------------
def test_models_lists_every_preset_and_finds_one(keyed):
    url, ctx = keyed
    c = client(url)
    assert [m.id for m in c.models.list()] == list(ctx.manager.presets)
    assert c.models.retrieve("tiny-base").id == "tiny-base"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


def test_chat_replies_as_the_chat_tab_does(keyed):
    """Same template, same greedy reply as a conversation in the app (gradio_client /chat)."""
    from gradio_client import Client

    url, _ = keyed
    r = ask(client(url))
    assert r.object == "chat.completion" and r.model == "tiny-instruct" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == Client(url, verbose=False).predict(QUESTION, api_name="/chat")
    u = r.usage
    assert u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_system_messages_go_through_the_template(keyed):
    url, ctx = keyed
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    r = client(url).chat.completions.create(model="tiny-instruct", messages=messages, temperature=0,
                                            extra_body={"cache_salt": "system"})
    tok = ctx.manager.get("tiny-instruct").tokenizer
    assert r.usage.prompt_tokens == len(chat.encode(tok, chat.render(chat.INSTRUCT, messages, True)))


def test_streaming_gives_the_same_text_and_a_usage_chunk(keyed):
    url, _ = keyed
    c = client(url)
    whole = ask(c, PROMPTS[1], extra_body={"cache_salt": "stream-a"})
    chunks = list(ask(c, PROMPTS[1], stream=True, stream_options={"include_usage": True},
                      extra_body={"cache_salt": "stream-b"}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content and len(chunks) > 3
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and all(ch.usage is None for ch in chunks[:-1])
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    plain = list(ask(c, PROMPTS[1], stream=True, extra_body={"cache_salt": "stream-c"}))
    assert all(ch.choices for ch in plain)
    assert "".join(ch.choices[0].delta.content or "" for ch in plain) == text


def test_a_resent_history_is_read_from_the_cache(keyed):
    """Clients resend the whole conversation each turn; only the new turn is read."""
    url, _ = keyed
    c = client(url)
    messages, previous = [], 0
    turns = ["Remember the word apple.", "Spell apple.", "What word did I ask you to remember?"]
    for turn, text in enumerate(turns):
        messages.append({"role": "user", "content": text})
        r = c.chat.completions.create(model="tiny-instruct", messages=messages, temperature=0, max_tokens=24,
                                      extra_body={"cache_salt": "multi-turn"})
        cached = r.usage.prompt_tokens_details.cached_tokens
        assert cached >= previous if turn else cached == 0, (turn, cached, previous)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        previous = r.usage.prompt_tokens


def test_completions_continue_text_and_cut_at_a_stop_string(keyed):
    url, _ = keyed
    c = client(url)
    kw = {"model": "tiny-base", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 24}
    whole = c.completions.create(**kw)
    text = whole.choices[0].text
    assert whole.object == "text_completion" and len(text) > 10
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stream=True))
    assert streamed == text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = c.completions.create(**kw, stop=[stop, "never appears"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert "".join(ch.choices[0].text for ch in c.completions.create(**kw, stop=stop, stream=True)) == \
        text[:text.index(stop)]
    ids = chat.encode(keyed[1].manager.get("tiny-base").tokenizer, "Once upon a time")
    assert c.completions.create(**{**kw, "prompt": ids}).choices[0].text == text  # token ids as the prompt


def test_chat_with_a_base_model_uses_the_plain_transcript(keyed):
    url, ctx = keyed
    messages = [{"role": "user", "content": "Tell me about cats."}]
    r = client(url).chat.completions.create(model="tiny-base", messages=messages, temperature=0,
                                            max_tokens=40)
    reply = r.choices[0].message.content
    tok = ctx.manager.get("tiny-base").tokenizer
    assert r.usage.prompt_tokens == len(chat.encode(tok, chat.render(chat.BASE, messages, True)))
    assert reply and not reply.startswith(" ") and "\nUser:" not in reply


def test_concurrent_clients_get_their_solo_replies(keyed):
    url, _ = keyed
    c = client(url)
    solo = [ask(c, p, extra_body={"cache_salt": f"solo-{i}"}).choices[0].message.content
            for i, p in enumerate(PROMPTS)]

    def one(i: int) -> str:
        r = ask(client(url), PROMPTS[i], extra_body={"cache_salt": f"together-{i}"})
        return r.choices[0].message.content

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(one, range(len(PROMPTS)))) == solo


# -- namespaces and sharing --------------------------------------------------------------------
def test_without_sharing_a_namespace_sees_only_its_own_cache(keyed):
    url, _ = keyed
    c = client(url)

    def cached(salt: str) -> int:
        return ask(c, PROMPTS[3], extra_body={"cache_salt": salt}).usage.prompt_tokens_details.cached_tokens

    assert cached("ns-one") == 0
    assert cached("ns-two") == 0  # the same prompt, another namespace: no hit
    assert cached("ns-one") > 0


def test_with_sharing_a_namespace_hits_what_another_cached(shared):
    url, _ = shared
    c = client(url, key="anything")  # an open server takes any key, or none
    first = ask(c, PROMPTS[0], extra_body={"cache_salt": "mine"}).usage
    second = ask(c, PROMPTS[0], extra_body={"cache_salt": "yours"}).usage
    assert first.prompt_tokens_details.cached_tokens == 0
    assert second.prompt_tokens_details.cached_tokens == second.prompt_tokens - 1


def _request(headers: dict[str, str] | None = None, address: str = "10.0.0.7") -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "headers": raw, "client": (address, 5000)})


def test_namespaces_are_per_client_and_derived_under_the_server_secret():
    def of(body: dict, headers: dict | None = None, address: str = "10.0.0.7", secret: str = "s") -> str:
        req: ApiRequest = parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], **body},
                                     Settings(device="cpu"))
        return namespace(_request(headers, address), req, secret)

    bearer = {"Authorization": "Bearer k1"}
    salt, user, key, address = of({"cache_salt": "s", "user": "u"}, bearer), of({"user": "u"}, bearer), \
        of({}, bearer), of({})
    assert [n.split(":")[0] for n in (salt, user, key, address)] == ["api-salt", "api-user", "api-key", "api-address"]
    assert all(len(n.split(":")[1]) == 32 and "k1" not in n for n in (salt, user, key, address))
    # one key, several clients: told apart by salt, user or address
    assert len({salt, user, key, of({"user": "v"}, bearer), of({"cache_salt": "t"}, bearer),
                of({}, bearer, "10.0.0.8")}) == 6
    assert of({"user": "u"}) != user and of({}, {"Authorization": "Bearer k2"}) != key
    # the digest is keyed: without the server's secret nobody can compute another client's namespace
    assert of({}, secret="other") != address and of({}) == address


def test_a_namespace_secret_is_random_per_process_unless_set():
    import subprocess
    import sys

    code = ("from fm_demo.serving.namespaces import derive\n"
            "for s in ('', 'a secret', 'another secret'): print(derive('api-address', '10.0.0.7', secret=s))")

    def run() -> list[str]:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.split()

    one, two = run(), run()
    assert one[0] != two[0]  # no secret set: each process draws its own
    assert one[1] == two[1] != one[2]  # FM_DEMO_CACHE_SECRET: the same namespaces in every process


@pytest.fixture(scope="module")
def open_private():
    """An open API (no key) with sharing off, as a public Space runs."""
    settings = Settings(device="cpu", max_new_tokens=N, max_upload_chars=UPLOAD)
    ctx = context(settings)
    demo, url = serve(settings, ctx)
    yield url, ctx
    demo.close()


def test_a_crafted_session_hash_does_not_land_in_an_api_clients_namespace(open_private):
    """A browser picks its own session hash. One crafted to read as the namespace a keyless API
    client at 127.0.0.1 used to get finds none of what that client sent."""
    import hashlib

    from gradio_client import Client

    url, ctx = open_private
    secret = "Tell me where the spare key is hidden."
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "tiny-instruct", "temperature": 0, "messages": [{"role": "user", "content": secret}]})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 0
    browser = Client(url, verbose=False)
    browser.session_hash = f"api:address:{hashlib.sha256(b'127.0.0.1').hexdigest()[:32]}"
    browser.predict(secret, api_name="/chat")
    conv = ctx.store.get(browser.session_hash, "chat")
    assert conv.last_metrics.reused_tokens == 0 and conv.namespace.startswith("browser:")
    again = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "tiny-instruct", "temperature": 0, "messages": [{"role": "user", "content": secret}]})
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # its own namespace hits


def test_clients_that_share_a_key_see_only_their_own_hits(keyed):
    """Every holder of FM_DEMO_API_KEY used to share one namespace: now a `user`, or else the
    client's address, keeps each apart; the same client still hits its own prefix."""
    url, _ = keyed

    def cached(prompt: str, address: str = "127.0.0.1", **body) -> int:
        transport = httpx.HTTPTransport(local_address=address)
        with httpx.Client(transport=transport, timeout=120) as http:
            r = http.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
                "model": "tiny-instruct", "temperature": 0, "messages": [{"role": "user", "content": prompt}],
                **body})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("Which bird hunts at night?", user="alice") == 0
    assert cached("Which bird hunts at night?", user="bob") == 0
    assert cached("Which bird hunts at night?", user="alice") > 0
    assert cached("Name a large cat.") == 0
    assert cached("Name a large cat.", address="127.0.0.2") == 0
    assert cached("Name a large cat.") > 0


# -- errors ------------------------------------------------------------------------------------
def _status(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    err = e.value.body
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return e.value.status_code, err


def test_each_bad_request_gets_its_status_and_the_server_keeps_serving(keyed):
    url, _ = keyed
    c = client(url)
    assert _status(lambda: client(url, key="wrong").models.list())[0] == 401
    assert _status(lambda: ask(client(url, key="wrong")))[0] == 401
    status, err = _status(lambda: ask(c, model="no-such-model"))
    assert status == 404 and err["code"] == "model_not_found"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for kw, param in [({"n": 99}, "n"), ({"temperature": 5}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
                      ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"stop": [""]}, "stop"),
                      ({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tools"),
                      ({"tools": [], "tool_choice": "required"}, "tools"),
                      ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_p": 0}, "top_p"),
                      ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
                      ({"logit_bias": {"99999999": 1}}, "logit_bias"),
                      ({"response_format": {"type": "xml"}}, "response_format"),
                      ({"extra_body": {"stop_token_ids": [-1]}}, "stop_token_ids")]:
        status, err = _status(lambda kw=kw: ask(c, **kw))
        assert status == 400 and err["type"] == "invalid_request_error" and err["param"] == param, (kw, err)
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    status, err = _status(lambda: c.chat.completions.create(
        model="tiny-instruct", messages=[{"role": "user", "content": image}]))
    assert status == 400 and "image_url" in err["message"]
    assert _status(lambda: c.chat.completions.create(model="tiny-instruct", messages=[]))[0] == 400
    status, err = _status(lambda: ask(c, "x" * UPLOAD))
    assert status == 413 and err["code"] == "prompt_too_long"
    assert _status(lambda: c.completions.create(model="tiny-base", prompt="y" * (UPLOAD + 1)))[0] == 413
    auth = {"Authorization": f"Bearer {KEY}"}
    raw = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers=auth)
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    huge = httpx.post(f"{url}/v1/completions", content=b" " * (7 * UPLOAD + 70_000), headers=auth)
    assert huge.status_code == 413
    ok = ask(c, max_tokens=10_000, extra_body={"an_unknown_field": 1, "top_k": 5, "repetition_penalty": 1.1})
    assert ok.choices[0].message.content  # unknown fields ignored, max_tokens clamped to the cap


BAD_UNICODE = '"hi \\ud800 there"'  # JSON's escape of a lone surrogate: valid JSON, no Unicode text


def _bad_body(url: str, route: str, body: bytes) -> dict:
    r = httpx.post(f"{url}{route}", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400, (route, body[:80], r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err
    return err


def test_a_body_nested_too_deep_gets_a_400_on_every_route(keyed):
    """100,000 `[` used to be a 500 (RecursionError); one nested past MAX_JSON_DEPTH but within
    Python's recursion limit is refused too, before any field is read."""
    url, _ = keyed

    def deep(n: int, model: str = "tiny-instruct") -> bytes:
        return b'{"model": "%s", "x": ' % model.encode() + b"[" * n + b"]" * n + b"}"

    for route in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        for body in (b"[" * 20_000, deep(20_000), deep(65)):
            err = _bad_body(url, route, body)
            assert err["code"] == "invalid_json" and "nested more than 64 levels" in err["message"], err
    assert ask(client(url), extra_body={"x": [[[[1]]]]}).choices[0].message.content  # shallow nesting is fine


def test_a_string_that_is_not_unicode_gets_a_400_on_every_route(keyed):
    """A lone surrogate in a prompt, message, stop string, user, or a key used to be a 500 (the
    tokenizer or the namespace's hash raised); invalid UTF-8 bytes stay a 400."""
    url, _ = keyed
    msg = '{"model": "tiny-instruct", "messages": [{"role": "user", "content": %s}]%s}'
    cases = {
        "/v1/chat/completions": [msg % (BAD_UNICODE, ""), msg % ('"hi"', ', "stop": [%s]' % BAD_UNICODE),
                                 msg % ('"hi"', ', "user": %s' % BAD_UNICODE),
                                 msg % ('"hi"', ', "cache_salt": %s' % BAD_UNICODE)],
        "/v1/completions": ['{"model": "tiny-base", "prompt": %s}' % BAD_UNICODE,
                            '{"model": "tiny-base", "prompt": "hi", "logit_bias": {"\\udc00": 1}}'],
        "/tokenize": ['{"model": "tiny-base", "prompt": %s}' % BAD_UNICODE, msg % (BAD_UNICODE, "")],
        "/detokenize": ['{"model": "tiny-base", "tokens": [1], "note": %s}' % BAD_UNICODE],
    }
    for route, bodies in cases.items():
        for body in bodies:
            err = _bad_body(url, route, body.encode())
            assert err["code"] == "invalid_unicode" and "lone surrogate" in err["message"], err
    raw = b'{"model": "tiny-instruct", "messages": [{"role": "user", "content": "hi \xff"}]}'
    assert _bad_body(url, "/v1/chat/completions", raw)["code"] == "invalid_json"


def test_gradio_endpoints_refuse_bad_bodies_with_a_message(keyed):
    """The gradio_client API: a lone surrogate in a message is refused with a message that says
    so (it used to fail in the tokenizer as an unexpected error); a body nested too deep is
    Gradio's own 400."""
    url, _ = keyed
    deep = httpx.post(f"{url}/gradio_api/call/chat", content=b"[" * 100_000, timeout=60,
                      headers={"content-type": "application/json"})
    assert deep.status_code == 400
    body = b'{"data": ["hi \\ud800 there", 0, 1, 0, 1, 8, -1, "", ""]}'
    event = httpx.post(f"{url}/gradio_api/call/chat", content=body, timeout=60,
                       headers={"content-type": "application/json"}).json()["event_id"]
    stream = httpx.get(f"{url}/gradio_api/call/chat/{event}", timeout=60).text
    assert "event: error" in stream and "not valid Unicode" in stream and "went wrong" not in stream, stream


def test_a_busy_model_says_so_and_a_closed_stream_frees_its_row(shared):
    """One row and one waiting place: a third request is refused with 503 until the stream holding
    the row is closed by its client, which cancels the row at once (it would run ~100k tokens)."""
    url, ctx = shared
    c = client(url)
    sched = ctx.manager.get("rambler").runner.scheduler
    long = c.completions.create(model="rambler", prompt="Once upon a time", max_tokens=100_000, temperature=0,
                                stream=True)
    assert next(iter(long)).choices[0].text is not None
    waiting = ThreadPoolExecutor(1).submit(
        lambda: c.completions.create(model="rambler", prompt="Hello", max_tokens=2, temperature=0))
    _until(lambda: sched.stats()["waiting"] == 1)
    status, err = _status(lambda: c.completions.create(model="rambler", prompt="Hi", max_tokens=2))
    assert status == 503 and err["code"] == "server_busy"
    long.close()
    assert waiting.result(timeout=60).usage.completion_tokens == 2
    _until(lambda: sched.stats()["active_rows"] == 0 and sched.stats()["waiting"] == 0)
    assert sched.stats()["tokens"] < 50_000


def test_an_error_mid_stream_ends_the_stream_with_an_error_event(shared):
    url, ctx = shared
    c = client(url)
    lm = ctx.manager.get("rambler")
    stream = c.completions.create(model="rambler", prompt="Once upon a time", max_tokens=100_000,
                                  temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks)
    threading.Timer(0.2, ctx.manager.unload, [lm.key]).start()  # the model goes away mid-reply
    with pytest.raises(openai.APIError, match="unloaded"):
        for _ in chunks:
            pass
    again = c.completions.create(model="rambler", prompt="Once", max_tokens=3, temperature=0)  # loaded again
    assert again.usage.completion_tokens == 3


def _until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
