"""The programmatic API: /chat, /compare, /reset and /stats for gradio_client.

Each client (gradio_client.Client instance) is one Gradio session, so consecutive /chat calls
from it continue one conversation and reuse its cached recurrent state, exactly like the browser.
"""

from __future__ import annotations

from typing import Iterator

import gradio as gr

from .common import (
    AppContext,
    bind,
    check_message,
    controlled,
    open_conversation,
    reply_concurrency,
    sampling_params,
    session_id,
    throttle,
    user_errors,
)
from .compare_tab import SLOTS, interleave

CHAT_SLOT = "chat"


def _resolve(ctx: AppContext, preset: str | None) -> str:
    return preset or ctx.settings.default_preset


@user_errors
def chat(
    ctx: AppContext,
    message: str,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = -1,
    preset: str = "",
    precision: str = "",
    request: gr.Request = None,
) -> Iterator[str]:
    """Stream the reply to `message` in this client's conversation (greedy by default).

    Yields the reply text so far; the last value is the whole reply. preset/precision default to
    the server's chat model.
    """
    text = check_message(message, ctx.settings.max_input_chars)
    if text is None:  # an empty message does nothing, as in the browser
        yield ""
        return
    sid, conv = open_conversation(ctx, request, _resolve(ctx, preset), precision, CHAT_SLOT)
    sampling = sampling_params(temperature, top_p, top_k, repetition_penalty, seed)
    reply = ""
    for ev in controlled(ctx, sid, CHAT_SLOT, conv.send(text, sampling, int(max_new_tokens))):
        reply = ev.text
        yield reply


@user_errors
def compare(
    ctx: AppContext,
    message: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = -1,
    left_preset: str = "",
    left_precision: str = "",
    right_preset: str = "",
    right_precision: str = "",
    request: gr.Request = None,
) -> Iterator[dict]:
    """Stream `message` into both compare panes; yields {"left": text, "right": text}."""
    text = check_message(message, ctx.settings.max_input_chars)
    if text is None:
        yield {side: "" for side in SLOTS}
        return
    defaults = dict(zip(SLOTS, ctx.settings.compare_presets))
    picks = {
        "left": (left_preset or defaults["left"], left_precision),
        "right": (right_preset or defaults["right"], right_precision),
    }
    convs = {side: open_conversation(ctx, request, *picks[side], side)[1] for side in SLOTS}
    sampling = sampling_params(temperature, 1.0, 0, 1.0, seed)
    streams = {side: convs[side].send(text, sampling, int(max_new_tokens)) for side in SLOTS}
    texts = {side: "" for side in SLOTS}
    try:
        for side, ev in throttle(interleave(streams), is_last=lambda item: item[1].done):
            texts[side] = ev.text
            yield dict(texts)
    finally:
        for it in streams.values():
            it.close()


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


def register_api(ctx: AppContext) -> None:
    """Inside the Blocks context: the four endpoints, typed from the signatures above."""
    gr.api(bind(chat, ctx), api_name="chat", concurrency_limit=reply_concurrency(ctx))
    gr.api(bind(compare, ctx), api_name="compare", concurrency_limit=reply_concurrency(ctx))
    gr.api(bind(reset, ctx), api_name="reset", queue=False)
    gr.api(bind(stats, ctx), api_name="stats", queue=False)
