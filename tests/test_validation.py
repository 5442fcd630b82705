"""Sampling settings: one set of rules (LIMITS in fm_demo/engine/sampling.py) at every entry point,
and a sampler that never raises on settings that pass them.

Each hostile value is sent through each entry point: SamplingParams itself, the UI's Sampling
(and the chat tab's handler), the gradio_client /chat endpoint, /v1/chat/completions and
/v1/completions, the MCP chat tool and a cluster ReplyRequest. Every one must be refused promptly
(short client timeouts: a stalled scheduler fails the test) with the same text, naming the field,
the value and the allowed range. Values at the edges of the rules must get a reply.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import pickle
import re
import threading

import gradio as gr
import httpx
import pytest
import torch
from gradio_client import Client
from test_openai_api import context, serve

from fm_demo.cluster.protocol import ReplyRequest, checked_request
from fm_demo.engine.sampling import (
    LIMITS,
    Limit,
    SamplingError,
    SamplingParams,
    apply_repetition_penalty,
    make_generator,
    narrowed,
    sample,
)
from fm_demo.settings import Settings
from fm_demo.ui import chat_tab
from fm_demo.ui.inputs import Sampling
from fm_demo.ui.openai_schema import OPENAI_MAX_TEMPERATURE

# Gradio warns about gr.State inputs of every API function, tools or not: the tabs' events have some.
pytestmark = pytest.mark.filterwarnings("ignore:This MCP server includes a tool that has a gr.State input")

NAN, INF = float("nan"), float("inf")
TIMEOUT = 20  # seconds a refusal (or a 4-token reply of the tiny model) may take at most

# (field, value) that every entry point refuses. top_k -1 is vLLM's "off" on /v1 and seed -1 is
# "random" on the UI and gradio_client, so those use -2; each convention has a test of its own.
HOSTILE = [
    *[("temperature", v) for v in (1e-300, 1e-45, NAN, INF, -INF, -1, 11, True, "0.5")],
    *[("top_p", v) for v in (0, 0.0, NAN, INF, -1, 1.5, True, "0.9")],
    *[("top_k", v) for v in (-2, 2.5, NAN, INF, 2**64, True, "5")],
    *[("repetition_penalty", v) for v in (1e-300, 1e-45, 0, NAN, INF, -1, 1e300, True, "1.1")],
    *[("seed", v) for v in (1e20, 2**64, 2**63, -2, 2.5, NAN, INF, True, "3")],
]
# Values at the edges of the rules: each entry point answers them. top_p needs no floor (the most
# likely token is always kept), so 1e-300 is a valid, if nearly greedy, setting.
EDGES = [("temperature", 0.01), ("temperature", 2.0), ("top_p", 1e-300), ("top_p", 1e-45),
         ("top_k", 2**31 - 1), ("repetition_penalty", 0.01), ("repetition_penalty", 100.0),
         ("seed", 0), ("seed", 2**63 - 1)]
SAMPLED = {"temperature": 1.0}  # the edge is tried on a sampled reply, where it matters


def _id(case: tuple[str, object]) -> str:
    return f"{case[0]}={case[1]!r}"


def message(field: str, value: object, limit: Limit | None = None) -> str:
    """The one text every entry point gives for a refused setting."""
    return str(SamplingError(field, value, limit or LIMITS[field]))


# -- the rules themselves ------------------------------------------------------------------------
@pytest.mark.parametrize("case", HOSTILE, ids=_id)
def test_sampling_params_refuse_with_field_value_and_range(case):
    field, value = case
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field and isinstance(e.value, ValueError)
    text = str(e.value)
    assert text.startswith(f"{field} must be ") and text.endswith(f"got {value!r}")
    assert LIMITS[field].describe() in text


def test_the_messages_state_each_range():
    assert [message(f, v) for f, v in [("temperature", 1e-300), ("top_p", 0.0), ("top_k", -2),
                                       ("repetition_penalty", NAN), ("seed", 1e20)]] == [
        "temperature must be a number: 0 (greedy) or from 0.01 to 10, got 1e-300",
        "top_p must be a number greater than 0 and at most 1, got 0.0",
        "top_k must be an integer from 0 to 2147483647, got -2",
        "repetition_penalty must be a number from 0.01 to 100, got nan",
        "seed must be an integer from 0 to 9223372036854775807, got 1e+20",
    ]


@pytest.mark.parametrize("case", EDGES, ids=_id)
def test_edges_pass_and_whole_floats_become_ints(case):
    field, value = case
    assert getattr(SamplingParams(**{field: value}), field) == value
    p = SamplingParams(temperature=1, top_k=5.0, seed=7.0)  # JSON and sliders carry ints as floats
    assert (p.temperature, p.top_k, p.seed) == (1.0, 5, 7)
    assert type(p.temperature) is float and type(p.top_k) is int and type(p.seed) is int
    assert SamplingParams(seed=None).seed is None and SamplingParams(temperature=0).greedy


# -- the UI ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", HOSTILE, ids=_id)
def test_the_ui_sampling_refuses_with_the_same_text(case):
    field, value = case
    with pytest.raises(gr.Error) as e:
        Sampling(**{field: value}).for_reply()
    assert e.value.message == f"Invalid sampling setting: {message(field, value)}"


def test_the_ui_seed_minus_one_is_random_and_max_new_tokens_is_a_whole_number():
    params, n = Sampling(seed=-1, max_new_tokens=12.0).for_reply()
    assert params.seed is None and n == 12
    for bad in (NAN, INF, 2.5, True, "12"):
        with pytest.raises(gr.Error, match="max_new_tokens must be a whole number"):
            Sampling(max_new_tokens=bad).for_reply()


@pytest.fixture(scope="module")
def idle_context():
    """An app context whose models are never loaded by the tests that use it."""
    return context(Settings(device="cpu", max_new_tokens=4))


@pytest.mark.parametrize("case", [("temperature", 1e-300), ("seed", 1e20), ("repetition_penalty", NAN)],
                         ids=_id)
def test_the_chat_tab_refuses_before_loading_a_model(idle_context, case):
    field, value = case
    knobs = chat_tab.Knobs("tiny-instruct", "", "", Sampling(**{field: value}))
    handler = chat_tab.send(idle_context, "Hello", knobs, [], gr.Request(session_hash="ui-refused"))
    with pytest.raises(gr.Error, match=re.escape(message(field, value))):
        next(handler)
    assert idle_context.manager.loaded() == []


# -- a real server: gradio_client, /v1 and MCP --------------------------------------------------
@pytest.fixture(scope="module")
def url():
    settings = Settings(device="cpu", max_new_tokens=4, mcp_server=True)
    demo, url = serve(settings, context(settings))
    yield url
    demo.close()


@pytest.fixture(scope="module")
def gradio(url):
    return Client(url, verbose=False)


def _chat(client: Client, **kw) -> str:
    return client.submit("Hello", max_new_tokens=4, **kw, api_name="/chat").result(timeout=TIMEOUT)


CHAT_PARAMS = {"message": "Hello", "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
               "max_new_tokens": 4, "seed": -1, "preset": "", "precision": ""}  # /chat's, in order


def _chat_raw(url: str, **kw) -> str:
    """/chat over Gradio's HTTP API, for nan and inf, which gradio_client refuses to send as JSON:
    the text of the call's error event."""
    data = list({**CHAT_PARAMS, **kw}.values())
    r = httpx.post(f"{url}/gradio_api/call/chat", content=json.dumps({"data": data}), timeout=TIMEOUT,
                   headers={"Content-Type": "application/json"})
    with httpx.stream("GET", f"{url}/gradio_api/call/chat/{r.json()['event_id']}", timeout=TIMEOUT) as events:
        lines = list(events.iter_lines())
    assert "event: error" in lines, lines
    return json.loads(lines[lines.index("event: error") + 1].removeprefix("data: "))["error"]


@pytest.mark.parametrize("case", HOSTILE, ids=_id)
def test_the_gradio_client_chat_refuses_promptly(url, gradio, case):
    field, value = case
    expected = f"Invalid sampling setting: {message(field, value)}"
    if isinstance(value, float) and not math.isfinite(value):
        assert _chat_raw(url, **{field: value}) == expected
        return
    with pytest.raises(Exception, match=re.escape(expected)):
        _chat(gradio, **{field: value})


@pytest.mark.parametrize("case", [*EDGES, ("seed", -1)], ids=_id)
def test_the_gradio_client_chat_answers_the_edges(gradio, case):
    field, value = case
    assert isinstance(_chat(gradio, **{**SAMPLED, field: value}), str)


def _v1(url: str, route: str, **fields) -> httpx.Response:
    """A raw request: json.dumps writes nan and inf as NaN and Infinity, which Python's (and this
    server's) JSON reader takes, where a client library would refuse to send them."""
    body = {"model": "tiny-instruct", "max_tokens": 4, **fields}
    body |= {"messages": [{"role": "user", "content": "Hello"}]} if route == "chat/completions" else \
        {"prompt": "Hello"}
    return httpx.post(f"{url}/v1/{route}", content=json.dumps(body), timeout=TIMEOUT,
                      headers={"Content-Type": "application/json"})


ROUTES = ["chat/completions", "completions"]
V1_HOSTILE = [*HOSTILE, ("temperature", 2.5), ("seed", -1)]  # OpenAI caps temperature at 2


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", V1_HOSTILE, ids=_id)
def test_v1_refuses_with_400_naming_the_param(url, route, case):
    field, value = case
    r = _v1(url, route, **{field: value})
    assert r.status_code == 400, r.text
    limit = narrowed("temperature", OPENAI_MAX_TEMPERATURE) if field == "temperature" else None
    assert r.json() == {"error": {"message": message(field, value, limit), "type": "invalid_request_error",
                                  "param": field, "code": "invalid_value"}}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", [*EDGES, ("top_k", -1)], ids=_id)
def test_v1_answers_the_edges(url, route, case):
    field, value = case
    r = _v1(url, route, **{**SAMPLED, field: value})
    assert r.status_code == 200, r.text


MCP_HOSTILE = [("temperature", 1e-300), ("temperature", 1e-45), ("top_p", 0.0), ("top_k", -2),
               ("repetition_penalty", 1e-300), ("seed", 1e20), ("seed", 2**64)]


def test_the_mcp_chat_tool_refuses_each_with_the_same_text(url):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    async def calls():
        async with streamablehttp_client(f"{url}/gradio_api/mcp/") as (read, write, _), \
                ClientSession(read, write) as session:
            await session.initialize()
            return [await session.call_tool("chat", {"message": "Hello", "max_new_tokens": 4, field: value})
                    for field, value in MCP_HOSTILE]

    results = asyncio.run(asyncio.wait_for(calls(), timeout=len(MCP_HOSTILE) * TIMEOUT))
    for (field, value), result in zip(MCP_HOSTILE, results):
        assert result.isError, (field, value)
        assert message(field, value) in result.content[0].text, (field, value, result.content[0].text)


# -- the cluster's requests ---------------------------------------------------------------------
def _unchecked(**fields) -> SamplingParams:
    """A SamplingParams holding values no constructor lets through, as a crafted pickle arrives."""
    params = SamplingParams()
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


@pytest.mark.parametrize("case", HOSTILE, ids=_id)
def test_a_replica_refuses_a_request_before_reading_it(case):
    from fm_demo.cluster.replica import run_reply

    field, value = case
    req = ReplyRequest(("tiny-instruct", "fp32"), "ns", None, [1, 2, 3], _unchecked(**{field: value}), 4)
    sent = pickle.loads(pickle.dumps(req))  # how it travels: unpickling runs no __post_init__
    with pytest.raises(SamplingError, match=re.escape(message(field, value))):
        checked_request(sent)
    emitted: list = []
    untouched = object()  # the model: any use of it would raise AttributeError, not SamplingError
    with pytest.raises(SamplingError):
        run_reply(untouched, sent, "local", emitted.append, threading.Event(), lambda ref: ref)
    assert emitted == []


def test_a_replica_keeps_a_valid_request():
    req = ReplyRequest(("tiny-instruct", "fp32"), "ns", None, [1], SamplingParams(temperature=0.5, seed=3), 4)
    assert checked_request(pickle.loads(pickle.dumps(req))) == req
    with pytest.raises(ValueError, match="max_new_tokens"):
        checked_request(ReplyRequest(req.key, "ns", None, [1], SamplingParams(), -1))


# -- the sampler -----------------------------------------------------------------------------------
V = 48
F32_MAX = torch.finfo(torch.float32).max


def _logit_cases(seed: int) -> list[torch.Tensor]:
    """Rows [4, V] the model could give: any finite size, -inf where masked, some rows all masked."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for scale in (1e-30, 1e-3, 1.0, 30.0, 1e4, 1e20, 1e38):
        rows = (torch.randn(4, V, generator=g) * scale).clamp(-F32_MAX, F32_MAX)
        masked = torch.rand(4, V, generator=g) < torch.tensor([[0.0], [0.5], [0.97], [1.0]])
        masked[2, torch.randint(0, V, (1,), generator=g)] = False  # row 2: one token left
        out.append(rows.masked_fill(masked, float("-inf")))
    out.append(torch.full((4, V), F32_MAX) * torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]))  # ties at the top
    edges = torch.zeros(4, V)
    edges[:, 0], edges[:, 1] = F32_MAX, -F32_MAX
    out.append(edges)
    return out


PARAM_EXTREMES = {
    "temperature": (0.0, 0.01, 1.0, 10.0),
    "top_k": (0, 1, V - 1, 2**31 - 1),
    "top_p": (5e-324, 1e-300, 1e-45, 0.5, 1.0),
    "repetition_penalty": (0.01, 1.0, 100.0),
    "seed": (None, 0, 2**63 - 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sample_never_raises_and_returns_an_id_for_any_valid_params(dtype):
    cases = [c.to(dtype) for c in _logit_cases(0)]
    prev = torch.tensor([[0, 1, 5, 7, V - 1]] * 4)
    combos = [dict(zip(PARAM_EXTREMES, values)) for values in itertools.product(*PARAM_EXTREMES.values())]
    for kw in combos:
        params = SamplingParams(**kw)
        for logits in cases:
            for seen in (None, prev):
                ids = sample(logits, params, make_generator(params, "cpu"), seen)
                assert ids.shape == (4,) and ids.dtype == torch.int64, kw
                assert bool(((ids >= 0) & (ids < V)).all()), (kw, ids)


def test_sample_never_raises_on_random_logits_and_params():
    g = torch.Generator().manual_seed(1)
    pick = lambda options: options[int(torch.randint(0, len(options), (1,), generator=g))]
    for _ in range(400):
        scale = 10 ** float(torch.empty(1).uniform_(-40, 38, generator=g))
        logits = torch.randn(3, V, generator=g) * scale
        logits[torch.rand(3, V, generator=g) < pick([0.0, 0.3, 0.99, 1.0])] = float("-inf")
        logits = logits.to(pick([torch.float32, torch.bfloat16]))
        params = SamplingParams(**{name: pick(options) for name, options in PARAM_EXTREMES.items()})
        seen = torch.randint(0, V, (3, int(torch.randint(0, 6, (1,), generator=g))), generator=g)
        ids = sample(logits, params, make_generator(params, "cpu"), seen)
        assert bool(((ids >= 0) & (ids < V)).all()), params


def test_sample_keeps_only_allowed_tokens_at_the_extremes():
    logits = torch.tensor([[1.0, 3.0, 2.0, float("-inf")]]).repeat(200, 1)
    tiny_p = SamplingParams(temperature=10.0, top_p=1e-300, seed=0)  # only the most likely survives
    assert set(sample(logits, tiny_p, make_generator(tiny_p, "cpu")).tolist()) == {1}
    hot = SamplingParams(temperature=10.0, seed=0)  # never a masked token, however hot
    assert 3 not in set(sample(logits, hot, make_generator(hot, "cpu")).tolist())
    huge = torch.tensor([[F32_MAX, F32_MAX / 2, -F32_MAX]]).repeat(200, 1)  # no overflow to nan
    cold = SamplingParams(temperature=0.01, seed=0)
    assert set(sample(huge, cold, make_generator(cold, "cpu")).tolist()) == {0}


def test_greedy_is_the_argmax_of_the_penalized_float_logits_bit_for_bit():
    """Greedy replies are unchanged: argmax of the float32 logits after CTRL's penalty, as before."""
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(8, V, generator=g) * 5).to(dtype)
        prev = torch.randint(0, V, (8, 6), generator=g)
        for penalty in (0.01, 1.0, 1.3, 100.0):
            seen = logits.float().gather(1, prev)
            old = logits.float().scatter(1, prev, torch.where(seen > 0, seen / penalty, seen * penalty))
            params = SamplingParams(repetition_penalty=penalty)
            assert torch.equal(sample(logits, params, None, prev), old.argmax(-1))
            assert torch.equal(apply_repetition_penalty(logits.float(), prev, penalty).argmax(-1),
                               old.argmax(-1))


def test_the_limits_keep_float32_math_finite():
    """The floors and caps are what keep a penalty or a temperature a usable float32 number."""
    for field in ("temperature", "repetition_penalty"):
        lo, hi = LIMITS[field].lo, LIMITS[field].hi
        for v in (lo, hi):
            assert math.isfinite(torch.tensor(v, dtype=torch.float32).item())
            assert torch.tensor(v, dtype=torch.float32).item() > 0
