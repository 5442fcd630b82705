"""The API features real clients need, through the official `openai` client against the real app:
log-probabilities (checked against a direct forward pass of the engine), echo scoring, n replies
from one read, structured output and forced tool calls, logit bias, vLLM's extra fields and the
token routes."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from pydantic import BaseModel, Field
from test_openai_api import KEY, client, context, serve

from fm_demo import chat
from fm_demo.settings import Settings

LOGPROB_ATOL = 1e-4
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    settings = Settings(device="cpu", max_new_tokens=16, max_upload_chars=200_000, api_key=KEY)
    ctx = context(settings)
    demo, url = serve(settings, ctx)
    yield url, ctx
    demo.close()


def greedy_direct(lm, ids: list[int], steps: int) -> list[tuple[int, torch.Tensor]]:
    """(token, log_softmax row it was picked from) for `steps` greedy tokens, read afresh by the
    engine alone: the whole prompt, then one token at a time."""
    engine, state = lm.engine, lm.engine.new_state()
    logits = engine.prefill(torch.tensor([ids]), state)
    out = []
    for _ in range(steps):
        lp = torch.log_softmax(logits[0].float(), -1)
        tok = int(lp.argmax())
        out.append((tok, lp))
        logits = engine.step(torch.tensor([tok]), state)
    return out


def test_chat_logprobs_equal_a_direct_forward_pass(server):
    url, ctx = server
    r = client(url).chat.completions.create(model="tiny-instruct", messages=MESSAGES, temperature=0, max_tokens=6,
                                            logprobs=True, top_logprobs=3,
                                            extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    lm = ctx.manager.get("tiny-instruct")
    ids, _ = chat.encode_messages(lm.chat_format, lm.tokenizer, MESSAGES)
    for entry, (tok, lp) in zip(content, greedy_direct(lm, ids, 6)):
        assert entry.token == lm.tokenizer.decode([tok])
        assert abs(entry.logprob - float(lp[tok])) < LOGPROB_ATOL
        top = torch.topk(lp, 3)
        assert [a.token for a in entry.top_logprobs] == [lm.tokenizer.decode([t]) for t in top.indices.tolist()]
        assert all(abs(a.logprob - float(v)) < LOGPROB_ATOL for a, v in zip(entry.top_logprobs, top.values))
        assert entry.bytes == list(entry.token.encode())


def test_echo_scores_every_prompt_token_and_streams_logprobs(server):
    url, ctx = server
    c = client(url)
    prompt = "The capital of France is Paris. The capital of Italy is Rome."
    r = c.completions.create(model="tiny-base", prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    lp = r.choices[0].logprobs
    lm = ctx.manager.get("tiny-base")
    ids = chat.encode(lm.tokenizer, prompt)
    assert r.choices[0].text == prompt and len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    direct = torch.log_softmax(lm.engine.prefill(torch.tensor([ids]), lm.engine.new_state(), all_logits=True)[0], -1)
    for j in range(1, len(ids)):
        assert abs(lp.token_logprobs[j] - float(direct[j - 1, ids[j]])) < LOGPROB_ATOL, j
        assert len(lp.top_logprobs[j]) <= 2
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    chunks = list(c.completions.create(model="tiny-base", prompt=prompt, logprobs=1, max_tokens=5, stream=True,
                                       temperature=0, extra_body={"ignore_eos": True}))
    got = [t for ch in chunks for ch_choice in ch.choices if ch_choice.logprobs
           for t in ch_choice.logprobs.token_logprobs]
    assert len(got) == 5 and all(v <= 0 for v in got)


def test_n_seeded_replies_read_the_prompt_once_and_reproduce(server):
    url, ctx = server
    c = client(url)
    kw = dict(model="tiny-instruct", messages=MESSAGES, n=4, temperature=1.0, seed=11, max_tokens=8)
    sched = ctx.manager.get("tiny-instruct").runner.scheduler
    read_before = sched.stats()["prefill_tokens"]
    a = c.chat.completions.create(**kw, extra_body={"cache_salt": "n-test-a"})
    read = sched.stats()["prefill_tokens"] - read_before
    b = c.chat.completions.create(**kw, extra_body={"cache_salt": "n-test-b"})
    texts = [ch.message.content for ch in sorted(a.choices, key=lambda ch: ch.index)]
    assert [ch.index for ch in a.choices] == [0, 1, 2, 3]
    assert texts == [ch.message.content for ch in sorted(b.choices, key=lambda ch: ch.index)]
    assert read == a.usage.prompt_tokens  # one read of the prompt for four replies
    assert 4 <= a.usage.completion_tokens <= 4 * 8  # the four replies' tokens, the prompt counted once
    stream = list(c.chat.completions.create(model="tiny-instruct", messages=MESSAGES, n=3, temperature=0,
                                            max_tokens=4, stream=True))
    finished = {ch.index for s in stream for ch in s.choices if ch.finish_reason}
    assert finished == {0, 1, 2}
    pieces = {i: "".join(ch.delta.content or "" for s in stream for ch in s.choices if ch.index == i) for i in range(3)}
    assert pieces[0] == pieces[1] == pieces[2]  # greedy: three times the same reply


class City(BaseModel):
    """Bounded fields: the tiny model, never trained on JSON, does not close an unbounded string on
    its own at temperature 0; the bounds are part of the schema the grammar enforces."""

    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0, le=100_000_000)


def test_parse_returns_a_pydantic_object_from_the_tiny_model(server):
    url, _ = server
    r = client(url).chat.completions.parse(model="tiny-instruct", messages=MESSAGES, response_format=City,
                                           max_tokens=200, temperature=0)
    city = r.choices[0].message.parsed
    assert isinstance(city, City), r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and len(city.name) <= 24 and 0 <= city.population <= 100_000_000
    plain = client(url).chat.completions.create(model="tiny-instruct", messages=MESSAGES, max_tokens=200,
                                                temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(plain.choices[0].message.content), dict)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_forced_tool_call_parses(server, choice):
    url, _ = server
    r = client(url).chat.completions.create(model="tiny-instruct", messages=MESSAGES, tools=[WEATHER, TIME],
                                            tool_choice=choice, max_tokens=200, temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    call = ch.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    if isinstance(choice, dict):
        assert call.function.name == "get_time"
    if call.function.name == "get_time":
        assert args["zone"] in ("UTC", "CET")
    else:
        assert isinstance(args["city"], str) and isinstance(args["days"], int)
    follow = client(url).chat.completions.create(model="tiny-instruct", max_tokens=8, temperature=0, messages=[
        *MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert follow.choices[0].finish_reason in ("stop", "length")


def test_logit_bias_min_tokens_and_ignore_eos(server):
    url, ctx = server
    c = client(url)
    lm = ctx.manager.get("tiny-instruct")
    target = lm.tokenizer.encode("zebra", add_special_tokens=False)[0]
    r = c.chat.completions.create(model="tiny-instruct", messages=MESSAGES, max_tokens=5, temperature=0,
                                  logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == lm.tokenizer.decode([target] * 5, skip_special_tokens=True)
    r = c.chat.completions.create(model="tiny-instruct", messages=MESSAGES, max_tokens=12, temperature=0,
                                  extra_body={"min_tokens": 12})
    assert r.usage.completion_tokens == 12


def test_tokenize_and_detokenize_match_what_a_completion_reads(server):
    url, ctx = server
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/tokenize", json={"model": "tiny-instruct", "messages": MESSAGES}, headers=auth).json()
    done = client(url).chat.completions.create(model="tiny-instruct", messages=MESSAGES, max_tokens=1)
    assert r["count"] == len(r["tokens"]) == done.usage.prompt_tokens
    text = httpx.post(f"{url}/detokenize", json={"model": "tiny-instruct", "tokens": r["tokens"]}, headers=auth).json()
    assert "What is the capital of France?" in text["prompt"]
    bad = httpx.post(f"{url}/detokenize", json={"model": "tiny-instruct", "tokens": [-1]}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(f"{url}/tokenize", json={"model": "tiny-base", "prompt": "hi"}).status_code == 401
