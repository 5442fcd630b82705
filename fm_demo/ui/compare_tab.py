"""Compare tab: one prompt streams into two models at once, each with its own cached state.

The two replies advance in lockstep, one token of each in turn, in one handler: both panes
stream together and each pane's conversation keeps its own state across turns.
"""

from __future__ import annotations

import html
from typing import Iterator

import gradio as gr

from .common import (
    AppContext,
    check_message,
    controlled,
    interleave,
    model_pickers,
    on_preset_change,
    open_conversation,
    reply_concurrency,
    session_id,
    stop_reply,
    user_errors,
)
from .inputs import Sampling, bind, sampling_inputs
from .limits import limited
from .readout import live_metrics, readout_html

SLOTS = ("left", "right")
SLOT = "compare"  # the stop flag both panes share
# The sliders start at the UI's sampling defaults but greedy, so that what differs between the panes
# is the models, and at shorter replies (never above the server's default), as two stream at once.
TEMPERATURE, MAX_NEW_TOKENS = 0.0, 128


def _panes(convs: dict, metrics: dict, streaming: bool) -> tuple:
    """(left chat, right chat, left readout, right readout)."""

    def shown(side):
        m = metrics.get(side)
        if streaming and m is not None:
            m = live_metrics(convs[side], m)
        return readout_html(m, streaming=streaming and side in metrics)

    return convs["left"].messages, convs["right"].messages, shown("left"), shown("right")


@user_errors
def compare(
    ctx: AppContext,
    message: str,
    left_preset: str,
    left_precision: str,
    right_preset: str,
    right_precision: str,
    sampling: Sampling,
    request: gr.Request,
    progress=gr.Progress(),
) -> Iterator[tuple]:
    """Stream one message into both panes: (message box, left chat, right chat, left/right readouts)."""
    text = check_message(message, ctx.settings.max_input_chars)
    if text is None:
        yield (gr.skip(),) * 5
        return
    reply = sampling.for_reply()
    picks = {"left": (left_preset, left_precision), "right": (right_preset, right_precision)}
    convs = {side: open_conversation(ctx, request, *picks[side], side, progress)[1] for side in SLOTS}
    streams = interleave({side: convs[side].send(text, *reply) for side in SLOTS})
    replies = controlled(ctx, session_id(request), SLOT, streams)
    pending = [{"role": "user", "content": text}]
    yield "", convs["left"].messages + pending, convs["right"].messages + pending, gr.skip(), gr.skip()
    metrics = {}
    for side, ev in replies:
        metrics[side] = ev.metrics
        yield gr.skip(), *_panes(convs, metrics, streaming=True)
    final = {side: convs[side].last_metrics for side in SLOTS}
    yield gr.skip(), *_panes(convs, final, streaming=False)


def from_here_note(conv) -> str:
    """A pane's readout after "compare from here" (both panes on the chat's model)."""
    turns = "1 turn" if len(conv.turns) == 1 else f"{len(conv.turns)} turns"
    return (f"<div class='fm-readout fm-empty'>From the chat: {turns}, {conv.context_tokens:,} tokens, "
            f"on {html.escape(conv.lm.label)}. The states are shared with the chat, so the next message reads only "
            f"itself. Pick another model here to compare: that pane reads the history once.</div>")


@user_errors
def clear(ctx: AppContext, request: gr.Request) -> tuple:
    sid = session_id(request)
    for side in SLOTS:
        ctx.store.reset(sid, side)
    return "", [], [], readout_html(None), readout_html(None)


def build_compare_tab(ctx: AppContext) -> list:
    """The tab; returns what "compare from here" fills: the two chats, their readouts, and the two
    panes' model and precision pickers."""
    s = ctx.settings
    left_key, right_key = s.compare_presets
    gr.Markdown(
        "One prompt, two models, streamed side by side. Each pane keeps its own recurrent-state "
        "cache across turns, so later turns read only their new tokens. Try base vs instruct, or "
        "bf16 vs 4-bit of the same model."
    )
    panes = {}
    with gr.Row(equal_height=False):
        for side, key in (("left", left_key), ("right", right_key)):
            with gr.Column():
                preset, precision = model_pickers(ctx, key, label=f"{side.capitalize()} model")
                chatbot = gr.Chatbot(
                    height=380, label=side.capitalize(), elem_id=f"compare-{side}", buttons=["copy"]
                )
                readout = gr.HTML(readout_html(None), elem_id=f"compare-{side}-readout")
                preset.input(
                    bind(on_preset_change, s), preset, precision, api_name=f"compare_{side}_precisions"
                )
                panes[side] = (preset, precision, chatbot, readout)
    with gr.Row():
        msg = gr.Textbox(
            placeholder="One message for both models", show_label=False, scale=6, elem_id="compare-input"
        )
        send_btn = gr.Button(
            "Send to both", variant="primary", scale=1, min_width=100, elem_id="compare-send"
        )
    with gr.Row():
        stop_btn = gr.Button("Stop", variant="stop", size="sm", elem_id="compare-stop")
        clear_btn = gr.Button("Clear both", size="sm", elem_id="compare-clear")
    with gr.Accordion("Sampling (both panes)", open=False), gr.Row():
        defaults = Sampling(temperature=TEMPERATURE, max_new_tokens=min(MAX_NEW_TOKENS, s.max_new_tokens))
        sampling = sampling_inputs(s, defaults, elem_prefix="compare")

    (lp, lq, lchat, lread), (rp, rq, rchat, rread) = panes["left"], panes["right"]
    inputs = [msg, lp, lq, rp, rq, *sampling]
    outs = [msg, lchat, rchat, lread, rread]
    for trigger, name in ((msg.submit, "compare_send"), (send_btn.click, "compare_send_button")):
        trigger(limited(bind(compare, ctx)), inputs, outs, api_name=name, concurrency_limit=reply_concurrency(ctx))
    stop_btn.click(bind(stop_reply, ctx, SLOT), None, None, api_name="compare_stop", queue=False)
    clear_btn.click(bind(clear, ctx), None, outs, api_name="compare_clear")
    return [lchat, rchat, lread, rread, lp, lq, rp, rq]
