"""Chat tab: a streaming chat whose recurrent state is cached between turns, with live metrics.

Every reply handler (send, retry, edit) takes the tab's Knobs (model, system prompt, sampling)
and the plot points, and yields the same six outputs: (message box, chatbot, readout html,
memory plot, speed plot, plot points). The memory plot shows the state against a transformer's
KV cache; the device-memory plot redraws when the points change.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gradio as gr
import pandas as pd

from ..engine import DecodeOptions
from ..settings import MiB
from .common import (
    AppContext,
    check_message,
    controlled,
    model_pickers,
    on_preset_change,
    open_conversation,
    precision_choices,
    preset_choices,
    session_id,
    stop_reply,
    sweep,
    user_errors,
)
from . import explore
from .inputs import Inputs, Sampling, bind, input_components, sampling_inputs
from .limits import limited
from .plots import series_plot
from .theme import icon
from .readout import (
    DEVICE_COLORS,
    MEMORY_COLORS,
    SPEED_COLORS,
    device_frame,
    live_metrics,
    plot_points,
    readout_html,
    speed_frame,
    state_kv_frame,
    trim_points,
)

SLOT = "chat"
# What the bundled tiny instruct model can do (the 7B answers them too). The sums are pairs held out
# of its training data; the last prompt recalls a word from earlier turns through the state.
EXAMPLES = ["What is 47 + 35?", "what's 80 minus 29", "Is 17 greater than 9?", "Remember the word falcon.",
            "Spell the word cat backwards.", "hi! what is the capital of japan",
            "Which word did I ask you to remember?", "Write a poem about the sea.", "What can you do?"]
SKIP_ALL = (gr.skip(),) * 6  # a reply handler's outputs, all left as they are
HIDDEN = gr.HTML(visible=False)


@dataclass(frozen=True)
class Knobs(Inputs):
    """The model, system prompt and sampling every reply handler takes (bind() spreads them)."""

    preset: str
    precision: str
    system: str
    sampling: Sampling
    json_schema: str = ""  # "Reply as JSON matching this schema": empty for a free reply
    replies: int = 1  # Show N replies: 1, or 2 to 4 sampled from one read of the message


def _open(ctx: AppContext, request, knobs: Knobs, progress):
    return open_conversation(ctx, request, knobs.preset, knobs.precision, SLOT, progress, knobs.system)


def reply_options(conv, schema_text: str) -> DecodeOptions:
    """The reply's DecodeOptions: a grammar for the JSON schema in the box (the API's
    response_format json_schema), or nothing when it is empty; a schema that is no JSON, or that
    the grammar cannot compile, is the user's to fix."""
    text = (schema_text or "").strip()
    if not text:
        return DecodeOptions()
    from ..engine.constraints import ConstraintError, compile_grammar

    try:
        schema = json.loads(text)
    except ValueError as e:
        raise gr.Error(f"The JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise gr.Error("The JSON schema must be a JSON object, such as {\"type\": \"object\"}.")
    lm = conv.lm
    try:
        grammar = compile_grammar("json_schema", schema, lm.tokenizer, lm.engine.config.vocab_size, conv.stop_ids(lm))
    except ConstraintError as e:
        raise gr.Error(f"That JSON schema cannot be used: {e}") from None
    return DecodeOptions(grammar=grammar)


def _stream(
    ctx: AppContext, sid: str, conv, events: Iterator, points: list, sent: str | None = None
) -> Iterator[tuple]:
    """The outputs: the message just sent (if any), the reply while it streams, then the final
    readout and plots."""
    replies = controlled(ctx, sid, SLOT, events)
    if sent is not None:
        yield "", conv.messages + [{"role": "user", "content": sent}], *SKIP_ALL[2:]
    for ev in replies:
        if not ev.done:
            yield (
                gr.skip(),
                conv.messages,
                readout_html(live_metrics(conv, ev.metrics), streaming=True),
                gr.skip(),
                gr.skip(),
                gr.skip(),
            )
    m = conv.last_metrics
    points = plot_points(points, m)
    yield gr.skip(), conv.messages, readout_html(m), state_kv_frame(points), speed_frame(points), points


@user_errors
def send(
    ctx: AppContext, message: str, knobs: Knobs, points: list, request: gr.Request, progress=gr.Progress()
) -> Iterator[tuple]:
    """A new user message: the state continues from the last turn, only this turn is read. With
    knobs.replies > 1, that many replies from one read stream side by side (the last output)."""
    text = check_message(message, ctx.settings.max_input_chars)
    if text is None:
        yield (*SKIP_ALL, gr.skip())
        return
    reply = knobs.sampling.for_reply()  # checked before the model loads
    n = _replies(knobs.replies)
    sid, conv = _open(ctx, request, knobs, progress)
    options = reply_options(conv, knobs.json_schema)
    if n == 1:
        for out in _stream(ctx, sid, conv, conv.send(text, *reply, options=options), points, sent=text):
            yield (*out, HIDDEN)
        return
    yield from _stream_many(ctx, sid, conv, conv.send_many(text, n, *reply, options=options), points, text)


def _replies(value) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise gr.Error(f"Replies per message must be 1 to 4, got {str(value)[:20]!r}.") from None
    if not 1 <= n <= 4:
        raise gr.Error(f"Replies per message must be 1 to 4, got {n}.")
    return n


def _stream_many(ctx: AppContext, sid: str, conv, events: Iterator, points: list, sent: str) -> Iterator[tuple]:
    """Show N replies: the first streams in the chat, all of them side by side below it."""
    turn = len(conv.turns)
    yield "", conv.messages + [{"role": "user", "content": sent}], *SKIP_ALL[2:], gr.skip()
    for ev in controlled(ctx, sid, SLOT, events):
        if not ev.done:
            yield (gr.skip(), conv.messages, readout_html(live_metrics(conv, ev.metrics), streaming=True),
                   gr.skip(), gr.skip(), gr.skip(), gr.HTML(explore.many_html(ev.texts, turn, None, False), visible=True))
    m = conv.last_metrics
    points = plot_points(points, m)
    many = explore.many_for(conv, turn)
    yield (gr.skip(), conv.messages, readout_html(m), state_kv_frame(points), speed_frame(points), points,
           HIDDEN if many is None else gr.HTML(many, visible=True))


def _user_turn(messages: list[dict], index) -> int:
    """The 0-based user turn of chatbot message `index`."""
    index = index[0] if isinstance(index, (list, tuple)) else int(index)
    return sum(1 for m in messages[:index] if m["role"] == "user")


@user_errors
def retry(
    ctx: AppContext, knobs: Knobs, points: list, request: gr.Request, progress=gr.Progress()
) -> Iterator[tuple]:
    """A new reply to the last user message, from the snapshot before its reply (one token read).

    The chatbot shows its retry icon on the last reply only, so the button and the icon agree.
    """
    reply = knobs.sampling.for_reply()
    sid, conv = _open(ctx, request, knobs, progress)
    if not conv.turns:
        raise gr.Error("Nothing to retry yet: send a message first.")
    yield from _stream(ctx, sid, conv, conv.retry(*reply, options=reply_options(conv, knobs.json_schema)), points)


@user_errors
def edit(
    ctx: AppContext,
    knobs: Knobs,
    points: list,
    edit_data: gr.EditData,
    request: gr.Request,
    progress=gr.Progress(),
) -> Iterator[tuple]:
    """The user edited one of their messages in the chatbot: replay from there."""
    value = edit_data.value if isinstance(edit_data.value, str) else str(edit_data.value)
    text = check_message(value, ctx.settings.max_input_chars)
    if text is None:
        raise gr.Error("An edited message cannot be empty; use Undo to remove a turn.")
    reply = knobs.sampling.for_reply()
    sid, conv = _open(ctx, request, knobs, progress)
    events = conv.edit(_user_turn(conv.messages, edit_data.index), text, *reply,
                       options=reply_options(conv, knobs.json_schema))
    yield from _stream(ctx, sid, conv, events, points)


@user_errors
def undo(ctx: AppContext, preset: str, precision: str, points: list, request: gr.Request) -> tuple:
    """Remove the last exchange (the chatbot's undo icon sits on it too); its text returns to the box.
    The history follows (a conversation left without a turn leaves it)."""
    _, conv = open_conversation(ctx, request, preset, precision, SLOT)
    text = conv.undo()
    ctx.store.save(conv)
    box = gr.skip() if text is None else text
    points = trim_points(points, conv.context_tokens)
    plots = (state_kv_frame(points), speed_frame(points)) if points else (None, None)
    return box, conv.messages, readout_html(conv.last_metrics), *plots, points


@user_errors
def clear(ctx: AppContext, request: gr.Request) -> tuple:
    """An empty chat; the cleared conversation stays in the history (the sidebar deletes it)."""
    ctx.store.reset(session_id(request), SLOT)
    return "", [], readout_html(None), None, None, []  # None empties a plot (an empty frame would stall it)


@user_errors
def export(ctx: AppContext, preset: str, precision: str, request: gr.Request) -> gr.File:
    """Write transcript + state to a file the browser downloads, in the app's export folder
    (exports older than Settings.temp_file_age_s leave it first)."""
    _, conv = open_conversation(ctx, request, preset, precision, SLOT)
    if not conv.turns:
        raise gr.Error("Nothing to export yet: the conversation is empty.")
    sweep(ctx.exports, ctx.settings.temp_file_age_s)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"  # two exports never share a name
    path = ctx.exports / f"conversation-{preset}-{stamp}.fmconv"
    path.write_bytes(conv.export())
    ctx.export_files.add(str(path))
    return gr.File(value=str(path), visible=True)


@user_errors
def import_file(ctx: AppContext, file, request: gr.Request) -> tuple:
    """Resume an exported conversation (transcript and state) on the model it was saved with."""
    path = Path(file if isinstance(file, str) else file.name)
    size, limit = path.stat().st_size, ctx.settings.max_import_bytes
    if size > limit:
        raise gr.Error(f"That file is {size / MiB:,.1f} MiB; the import limit is {limit / MiB:,.0f} MiB.")
    conv = ctx.store.import_bytes(session_id(request), path.read_bytes(), SLOT)
    gr.Info(f"Imported {len(conv.turns)} turns ({conv.context_tokens:,} tokens) on {conv.lm.label}.")
    preset, precision = conv.lm.key
    return (
        "",
        conv.messages,
        readout_html(None),
        None,
        None,
        [],
        gr.Dropdown(choices=preset_choices(ctx.manager), value=preset),
        gr.Dropdown(choices=precision_choices(ctx.settings, preset), value=precision),
    )


def _chat_of(ctx: AppContext, request: gr.Request):
    """This page's chat conversation, or a message: branches act on what the page shows."""
    conv = ctx.store.get(session_id(request), SLOT)
    if conv is None or conv.lm is None or not conv.turns:
        raise gr.Error("That conversation is no longer open here; send a message or open it from the history.")
    return conv


def _shown_after(conv, points: list) -> tuple:
    """The chat outputs after a switch or a new chat: its messages, readout and the plots' points
    that still hold (points past the shown context belong to another version)."""
    points = trim_points(points, conv.context_tokens)
    plots = (state_kv_frame(points), speed_frame(points)) if points else (None, None)
    return gr.skip(), conv.messages, readout_html(conv.last_metrics), *plots, points


@user_errors
def act(ctx: AppContext, points: list, token_on: bool, view_turn: int | None, evt: gr.EventData,
        request: gr.Request) -> tuple:
    """A reply's controls and the N-replies panel: show another version of a turn (switch), copy the
    conversation up to a reply into a new chat (newchat), or into both compare panes (compare).
    Outputs: the chat's six, branch data, token view, N-replies panel, compare's chats, readouts
    and pickers (compare_tab.build_compare_tab), the tabs. Compare's panes start on the chat's
    model, whose states they share."""
    action = explore.event_action(evt, ("switch", "newchat", "compare"))
    turn = explore.event_ints(evt, "turn")["turn"]
    sid = session_id(request)
    conv = _chat_of(ctx, request)
    if action == "switch":
        conv.switch(turn, explore.event_ints(evt, "version")["version"])
        ctx.store.save(conv)
        many = explore.many_for(conv, turn)
        many = gr.skip() if many is None else many
    elif action == "newchat":
        conv = ctx.store.put(sid, conv.fork(turn), SLOT)
        first = "the first turn" if turn == 0 else f"the first {turn + 1} turns"
        gr.Info(f"A new chat with {first}; the previous one stays in the history.")
        many = HIDDEN
    else:
        from .compare_tab import SLOTS, from_here_note

        panes = [ctx.store.put(sid, conv.fork(turn), side) for side in SLOTS]
        preset, precision = conv.lm.key
        pickers = (gr.Dropdown(choices=preset_choices(ctx.manager), value=preset),
                   gr.Dropdown(choices=precision_choices(ctx.settings, preset), value=precision))
        return ((gr.skip(),) * 9 + tuple(p.messages for p in panes) + tuple(from_here_note(p) for p in panes)
                + pickers * 2 + (gr.Tabs(selected="compare"),))
    return (*_shown_after(conv, points), explore.branch_data(conv), _token_view(conv, token_on, view_turn), many,
            *(gr.skip(),) * 9)


@user_errors
def rewind(ctx: AppContext, knobs: Knobs, points: list, evt: gr.EventData, request: gr.Request,
           progress=gr.Progress()) -> Iterator[tuple]:
    """A token chosen in the token view: that reply again from there, as a new version."""
    explore.event_action(evt, ("rewind",))
    where = explore.event_ints(evt, "turn", "pos", "token")
    reply = knobs.sampling.for_reply()
    sid, conv = _open(ctx, request, knobs, progress)
    events = conv.rewind(where["turn"], where["pos"], where["token"], *reply,
                         options=reply_options(conv, knobs.json_schema))
    yield from _stream(ctx, sid, conv, events, points)


def _token_view(conv, on: bool, turn: int | None):
    if not on:
        return gr.HTML(visible=False)
    return gr.HTML(explore.token_view_html(conv, turn), visible=True)


def refresh(ctx: AppContext, token_on: bool, view_turn: int | None, request: gr.Request) -> tuple:
    """After anything that changed the chat: its replies' controls, and the token view."""
    conv = ctx.store.get(session_id(request), SLOT)
    return explore.branch_data(conv), _token_view(conv, token_on, view_turn)


def select_reply(ctx: AppContext, token_on: bool, evt: gr.SelectData, request: gr.Request) -> tuple:
    """A click on a message: the token view shows that reply (its turn)."""
    conv = ctx.store.get(session_id(request), SLOT)
    index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    turn = None
    if conv is not None and isinstance(index, int) and index >= 0:
        turn = sum(1 for m in conv.messages[:index + 1] if m["role"] == "user") - 1
    return turn, _token_view(conv, token_on, turn)


def device_plot(points: list) -> pd.DataFrame | None:
    """The device-memory plot follows the per-turn points (None empties it, as clear and undo do
    to the other plots)."""
    return device_frame(points) if points else None


def shown(ctx: AppContext, conv) -> tuple:
    """What the chat shows of a conversation just opened (None: a new, empty one): the outputs of
    ChatView.shows, its model in the pickers."""
    if conv is None:
        return "", [], readout_html(None), None, None, [], gr.skip(), gr.skip()
    preset, precision = conv.lm.key
    return (
        "",
        conv.messages,
        readout_html(conv.last_metrics),
        None,
        None,
        [],
        gr.Dropdown(choices=preset_choices(ctx.manager), value=preset),
        gr.Dropdown(choices=precision_choices(ctx.settings, preset), value=precision),
    )


@dataclass
class ChatView:
    """The chat tab's parts that other parts of the page drive (the history sidebar, compare)."""

    shows: list  # the outputs `shown` fills: message box, chatbot, readout, plots, points, pickers
    changes: list  # the events after which the conversation's history row may have changed
    refresh: tuple  # (fn, inputs, outputs): redraw the replies' controls and the token view
    act: tuple  # (fn, inputs, outputs, triggers): the reply controls' event, compare's outputs to add


def connect_compare(chat: ChatView, compare_outputs: list, tabs: gr.Tabs) -> list:
    """Wire the reply controls ("compare from here" fills compare's panes and opens its tab)."""
    fn, inputs, outputs, triggers = chat.act
    return [trigger(fn, inputs, [*outputs, *compare_outputs, tabs], api_name=name, show_progress="hidden",
                    api_visibility="private")  # the page's controls send their data; no API client can
            for trigger, name in triggers]


def build_chat_tab(ctx: AppContext) -> ChatView:
    s = ctx.settings
    points = gr.State([])
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(
                label="Falcon Mamba",
                height=560,
                editable="user",
                elem_id="chatbot",
                buttons=["copy", "copy_all"],
                placeholder="Ask anything. Each turn reads only its new tokens.",
            )
            with gr.Row():
                msg = gr.Textbox(
                    placeholder="Type a message and press Enter",
                    show_label=False,
                    scale=6,
                    max_lines=8,
                    elem_id="chat-input",
                    autofocus=True,
                )
                send_btn = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="chat-send")
            with gr.Row(elem_id="chat-actions"):  # one row of icons on a phone (ui/theme.py)
                stop_btn = gr.Button("Stop", variant="stop", size="sm", icon=icon("stop"), elem_id="chat-stop")
                retry_btn = gr.Button("Retry", size="sm", icon=icon("retry"), elem_id="chat-retry")
                undo_btn = gr.Button("Undo", size="sm", icon=icon("undo"), elem_id="chat-undo")
                clear_btn = gr.Button("Clear", size="sm", icon=icon("clear"), elem_id="chat-clear")
                export_btn = gr.Button("Export", size="sm", icon=icon("export"), elem_id="chat-export")
                import_btn = gr.UploadButton(
                    "Import", size="sm", icon=icon("import"), file_types=[".fmconv"], elem_id="chat-import"
                )
            with gr.Row(elem_id="chat-explore"):
                replies = gr.Radio([1, 2, 3, 4], value=1, label="Replies per message", elem_id="chat-replies",
                                   info="2 to 4: sampled side by side from one read (temperature above 0)")
                token_on = gr.Checkbox(False, label="Token probabilities", elem_id="chat-token-toggle",
                                       info="colour each token; choose an alternative to continue from it")
            many_view = gr.HTML(visible=False, elem_id="chat-many", js_on_load=explore.CLICK_JS)
            token_view = gr.HTML(visible=False, elem_id="chat-token-view", js_on_load=explore.CLICK_JS)
            branch_ctl = gr.HTML("[]", html_template="<div></div>", elem_id="chat-branches",
                                 js_on_load=explore.BRANCH_JS)
            view_turn = gr.State(None)
            gr.Examples([[e] for e in EXAMPLES], inputs=msg, label="Try", elem_id="chat-examples")
            export_file = gr.File(label="Exported conversation", visible=False, height=60)
        with gr.Column(scale=2):
            readout = gr.HTML(readout_html(None), elem_id="readout")
            preset, precision = model_pickers(ctx, s.default_preset, elem_prefix="chat")
            system = gr.Textbox(s.system_prompt, label="System prompt", lines=2, placeholder="(none)")
            with gr.Accordion("Sampling", open=False, elem_id="chat-sampling"):
                sampling = sampling_inputs(s, elem_prefix="chat")
            with gr.Accordion("Reply as JSON", open=False, elem_id="chat-json"):
                json_schema = gr.Code(
                    "", language="json", lines=5, label="Reply as JSON matching this schema (empty: free text)",
                    elem_id="chat-json-schema")
    with gr.Row():
        mem_plot = series_plot(
            MEMORY_COLORS,
            state_kv_frame([]),
            x="context tokens",
            y="MiB",
            height=280,
            title="Falcon Mamba state vs KV cache (MiB)",
            y_lim=[0, None],
            elem_id="chat-memory",
        )
        device_mem_plot = series_plot(
            DEVICE_COLORS,
            device_frame([]),
            x="context tokens",
            y="MiB",
            height=280,
            title=f"Device memory (MiB, {'CUDA allocated' if s.device == 'cuda' else 'process RSS'})",
            y_lim=[0, None],
            elem_id="chat-device-memory",
        )
        speed_plot = series_plot(
            SPEED_COLORS,
            speed_frame([]),
            x="context tokens",
            y="tokens/s",
            height=280,
            title="Speed per turn (tokens/s)",
            y_lim=[0, None],
            elem_id="chat-speed",
        )

    knobs = input_components(Knobs, preset=preset, precision=precision, system=system, sampling=sampling,
                             json_schema=json_schema, replies=replies)
    knobs.append(points)
    outs = [msg, chatbot, readout, mem_plot, speed_plot, points]
    preset.input(bind(on_preset_change, s), preset, precision, api_name="chat_precisions")
    changes = []
    for trigger, name in ((msg.submit, "chat_send"), (send_btn.click, "chat_send_button")):
        changes.append(trigger(limited(bind(send, ctx)), [msg, *knobs], [*outs, many_view], api_name=name,
                               concurrency_limit=None))
    stop_btn.click(bind(stop_reply, ctx, SLOT), None, None, api_name="chat_stop", queue=False)
    changes += [
        retry_btn.click(limited(bind(retry, ctx)), knobs, outs, api_name="chat_retry", concurrency_limit=None),
        chatbot.retry(limited(bind(retry, ctx)), knobs, outs, api_name="chat_retry_at", concurrency_limit=None),
        chatbot.edit(limited(bind(edit, ctx)), knobs, outs, api_name="chat_edit", concurrency_limit=None),
        undo_btn.click(bind(undo, ctx), [preset, precision, points], outs, api_name="chat_undo"),
        chatbot.undo(bind(undo, ctx), [preset, precision, points], outs, api_name="chat_undo_at"),
        clear_btn.click(bind(clear, ctx), None, outs, api_name="chat_clear"),
        chatbot.clear(bind(clear, ctx), None, outs, api_name="chat_clear_icon"),
    ]
    export_btn.click(bind(export, ctx), [preset, precision], export_file, api_name="chat_export")
    changes.append(import_btn.upload(bind(import_file, ctx), import_btn, [*outs, preset, precision],
                                     api_name="chat_import"))
    changes.append(token_view.click(limited(bind(rewind, ctx)), knobs, outs, api_name="chat_rewind",
                                    concurrency_limit=None, api_visibility="private"))
    redraw = (bind(refresh, ctx), [token_on, view_turn], [branch_ctl, token_view])
    for event in changes:
        event.then(*redraw, api_visibility="private", show_progress="hidden")
    token_on.change(*redraw, api_visibility="private", show_progress="hidden")
    chatbot.select(bind(select_reply, ctx), token_on, [view_turn, token_view], api_visibility="private",
                   show_progress="hidden")
    act_io = (limited(bind(act, ctx)), [points, token_on, view_turn], [*outs, branch_ctl, token_view, many_view],
              ((branch_ctl.click, "chat_branch"), (many_view.click, "chat_pick")))
    # its own plot, fed by the points every reply handler already returns (their outputs stay as they are)
    points.change(device_plot, points, device_mem_plot, api_visibility="private", show_progress="hidden")
    return ChatView([*outs, preset, precision], changes, redraw, act_io)
