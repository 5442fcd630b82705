"""The programmatic API: /chat, /compare, /reset and /stats for gradio_client, and the MCP tools.

Each client (gradio_client.Client instance) is one Gradio session, so consecutive /chat calls
from it continue one conversation and reuse its cached recurrent state, exactly like the browser.

Gradio's MCP server (launch(mcp_server=True)) offers /chat and /compare as tools, described by
the docstrings below (the text before "Args:" describes the tool, each "name: text" line a
parameter). It calls them through one loopback gradio_client, so every MCP client would share
one Gradio session; an MCP call therefore runs in a session of its own, forgotten when it ends:
each call is a new conversation. /reset and /stats concern a client's session, which MCP calls
do not have, so they are not tools (`mcp_tools_only` in build.py hides every other function).
"""

from __future__ import annotations

import inspect
import secrets
from contextlib import contextmanager
from typing import Callable, Iterator

import gradio as gr

from .common import (
    AppContext,
    check_message,
    controlled,
    interleave,
    open_conversation,
    reply_concurrency,
    session_id,
    user_errors,
)
from .compare_tab import SLOT as COMPARE_SLOT
from .compare_tab import SLOTS
from .inputs import Sampling, bind
from .limits import limited

CHAT_SLOT = "chat"
NO_TOP_P, NO_TOP_K, NO_PENALTY = 1.0, 0, 1.0  # filters off: /compare has none (the values /chat defaults to)


def _resolve(ctx: AppContext, preset: str | None) -> str:
    return preset or ctx.settings.default_preset


MCP_TOOLS = ("chat", "compare")  # api names offered as MCP tools
MCP_USER_HEADER = "x-gradio-user"  # Gradio's MCP server sends "mcp" here on its loopback calls


def from_mcp(request: gr.Request | None) -> bool:
    headers = getattr(request, "headers", None) or {}
    return headers.get(MCP_USER_HEADER) == "mcp"


@contextmanager
def call_session(ctx: AppContext, request: gr.Request | None) -> Iterator[gr.Request | None]:
    """The request to run a call in: the client's own, or for an MCP call a fresh session whose
    conversations and stop flags are dropped when the call ends (see the module docstring)."""
    if not from_mcp(request):
        yield request
        return
    sid = f"mcp-{secrets.token_hex(8)}"
    try:
        yield gr.Request(session_hash=sid)
    finally:
        ctx.store.reset(sid)
        ctx.stops.forget(sid)


@user_errors
def chat(
    ctx: AppContext,
    message: str,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    max_new_tokens: int | None = None,
    seed: int = -1,
    preset: str = "",
    precision: str = "",
    request: gr.Request = None,
) -> Iterator[str]:
    """Ask Falcon Mamba (an attention-free language model) and get its reply; greedy by default.

    Consecutive calls from one gradio_client continue one conversation, each reading only its new
    tokens from the cached recurrent state; every MCP call is a new conversation. Streams the reply
    so far; the last value is the whole reply.

    Args:
        message: What to say to the model.
        temperature: Sampling temperature, 0.01 to 10; 0 always picks the most likely token (deterministic).
        top_p: Nucleus sampling: sample among the likeliest tokens holding this much probability (1: off).
        top_k: Sample among the k most likely tokens only (0: off).
        repetition_penalty: 0.01 to 100; above 1 discourages repeating tokens of the conversation (1: off).
        max_new_tokens: Longest reply in tokens (capped by the server).
        seed: Seed of the sampling (0 to 2**63 - 1), for a reproducible reply; -1 draws a random one.
        preset: Model to ask (e.g. tiny-instruct, 7b-instruct); empty: the server's chat model.
        precision: bf16, fp32 or 4bit; empty: the model's default on this server.
    """
    text = check_message(message, ctx.settings.max_input_chars)
    if text is None:  # an empty message does nothing, as in the browser
        yield ""
        return
    # checked before any model loads: a bad value is a prompt error, never a stalled reply
    sampling = Sampling(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed).for_reply()
    with call_session(ctx, request) as session:
        sid, conv = open_conversation(ctx, session, _resolve(ctx, preset), precision, CHAT_SLOT)
        reply = ""
        for ev in controlled(ctx, sid, CHAT_SLOT, conv.send(text, *sampling)):
            reply = ev.text
            yield reply


@user_errors
def compare(
    ctx: AppContext,
    message: str,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int = -1,
    left_preset: str = "",
    left_precision: str = "",
    right_preset: str = "",
    right_precision: str = "",
    request: gr.Request = None,
) -> Iterator[dict]:
    """Send one message to two models side by side (by default the base and the instruct model).

    Returns {"left": reply, "right": reply}. Like chat, calls from one gradio_client continue both
    conversations; every MCP call starts new ones.

    Args:
        message: What to say to both models.
        max_new_tokens: Longest reply in tokens, for each model.
        temperature: Sampling temperature, 0.01 to 10; 0 always picks the most likely token (deterministic).
        seed: Seed of the sampling (0 to 2**63 - 1); -1 draws a random one.
        left_preset: Model on the left; empty: the server's first compare model.
        left_precision: Its precision (bf16, fp32 or 4bit); empty: its default.
        right_preset: Model on the right; empty: the server's second compare model.
        right_precision: Its precision (bf16, fp32 or 4bit); empty: its default.
    """
    text = check_message(message, ctx.settings.max_input_chars)
    if text is None:
        yield {side: "" for side in SLOTS}
        return
    reply = Sampling(temperature, NO_TOP_P, NO_TOP_K, NO_PENALTY, max_new_tokens, seed).for_reply()
    defaults = dict(zip(SLOTS, ctx.settings.compare_presets))
    picks = {
        "left": (left_preset or defaults["left"], left_precision),
        "right": (right_preset or defaults["right"], right_precision),
    }
    with call_session(ctx, request) as session:
        convs = {side: open_conversation(ctx, session, *picks[side], side)[1] for side in SLOTS}
        streams = interleave({side: convs[side].send(text, *reply) for side in SLOTS})
        texts = {side: "" for side in SLOTS}
        for side, ev in controlled(ctx, session_id(session), COMPARE_SLOT, streams):
            texts[side] = ev.text
            yield dict(texts)


@user_errors
def reset(ctx: AppContext, slot: str = "", request: gr.Request = None) -> str:
    """Forget this client's conversations (all of them, or one slot: chat, left, right, long)."""
    ctx.store.reset(session_id(request), slot or None)
    return f"reset {slot or 'all conversations'}"


@user_errors
def stats(ctx: AppContext, slot: str = CHAT_SLOT, request: gr.Request = None) -> dict:
    """This client's last reply metrics in `slot` (JSON), plus the size of its conversation."""
    conv = ctx.store.get(session_id(request), slot or CHAT_SLOT)
    if conv is None:
        return {"slot": slot, "turns": 0, "context_tokens": 0, "last_reply": None}
    m = conv.last_metrics
    return {
        "slot": slot,
        "turns": len(conv.turns),
        "context_tokens": conv.context_tokens,
        "last_reply": m.as_dict() if m is not None else None,
    }


def server_defaults(fn: Callable, **values: object) -> Callable:
    """A bound endpoint as the API page and the MCP tools show it: each parameter named in
    `values`, whose None default stands for the server's value, defaults to that value and has
    its type (so /chat documents `max_new_tokens: int = 512` on a server whose default is 512)."""
    sig = inspect.signature(fn)
    fn.__signature__ = sig.replace(parameters=[
        p.replace(default=values[p.name], annotation=type(values[p.name])) if p.name in values else p
        for p in sig.parameters.values()
    ])
    fn.__annotations__.update({name: type(value) for name, value in values.items()})
    return fn


def register_api(ctx: AppContext) -> None:
    """Inside the Blocks context: the four endpoints, typed from the signatures above."""
    tokens = ctx.settings.max_new_tokens
    gr.api(limited(server_defaults(bind(chat, ctx), max_new_tokens=tokens)), api_name="chat",
           concurrency_limit=reply_concurrency(ctx))
    gr.api(limited(server_defaults(bind(compare, ctx), max_new_tokens=tokens)), api_name="compare",
           concurrency_limit=reply_concurrency(ctx))
    gr.api(bind(reset, ctx), api_name="reset", queue=False)
    gr.api(bind(stats, ctx), api_name="stats", queue=False)
