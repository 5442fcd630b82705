"""Long-context tab: read a long document by chunked prefill, then chat about it.

The document and a first question form one user turn, read chunk by chunk into the recurrent
state (progress bar and a live memory plot while it reads); follow-up questions continue from
that state and read only their own tokens.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import gradio as gr

from ..engine import SamplingParams
from ..metrics import KV_REFERENCE, device_memory, kv_cache_bytes
from ..settings import MiB
from .common import (
    AppContext,
    check_message,
    controlled,
    fmt_bytes,
    model_pickers,
    on_preset_change,
    open_conversation,
    reply_concurrency,
    stop_reply,
    user_errors,
)
from .inputs import Sampling, bind
from .limits import limited
from .plots import series_plot
from .readout import DEVICE_COLORS, device_memory_frame, live_metrics, readout_html

SLOT = "long"
POLL_S = 0.25  # how often the progress bar and memory plot refresh while the document is read
READ_AXIS = "tokens read"  # the memory plot's x axis
DEFAULT_QUESTION = "Summarize the text above in a few sentences."
MAX_NEW_TOKENS = 200  # the slider's start: room for a summary (never above the server's default)


def document_text(pasted: str | None, file, limit_chars: int) -> str:
    """The uploaded file's text, else the pasted text; refuses what exceeds the limit."""
    if file is not None:
        path = Path(file if isinstance(file, str) else file.name)
        if path.stat().st_size > 4 * limit_chars:  # cheap early refusal: UTF-8 has at most 4 bytes/char
            raise gr.Error(
                f"That file is {path.stat().st_size / MiB:,.1f} MiB; the limit is {limit_chars:,} characters."
            )
        text = path.read_bytes().decode("utf-8", errors="replace")
    else:
        text = pasted or ""
    if not text.strip():
        raise gr.Error("Paste a text or upload a .txt/.md file first.")
    if len(text) > limit_chars:
        raise gr.Error(
            f"That document has {len(text):,} characters; the limit is {limit_chars:,} "
            "(server setting FM_DEMO_MAX_UPLOAD_CHARS)."
        )
    return text


def _kv_note(tokens: int) -> str:
    return (
        f"A transformer's KV cache for these {tokens:,} tokens ({KV_REFERENCE.name}, "
        f"{fmt_bytes(KV_REFERENCE.bytes_per_token)}/token): **{fmt_bytes(kv_cache_bytes(tokens))}**."
    )


def _greedy(max_new_tokens: int) -> tuple[SamplingParams, int | None]:
    """Answers about a document are greedy (with the UI's other sampling defaults)."""
    return Sampling(temperature=0.0, max_new_tokens=max_new_tokens).for_reply()


class ReadStopped(Exception):
    """Stop was pressed while the document was being read (raised between chunks)."""


def _read_in_background(events: Iterator, on_tick) -> Iterator:
    """Run the reply up to its first event (the chunked prefill) in a thread; tick meanwhile."""
    box: dict = {}

    def first():
        try:
            box["event"] = next(events)
        except BaseException as e:  # re-raised in the handler's thread
            box["error"] = e

    worker = threading.Thread(target=first, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(POLL_S)
        yield on_tick()
    if "error" in box:
        raise box["error"]
    yield box.get("event")


@user_errors
def read_document(
    ctx: AppContext,
    pasted: str,
    file,
    question: str,
    preset: str,
    precision: str,
    max_new_tokens: int,
    request: gr.Request,
    progress=gr.Progress(),
) -> Iterator[tuple]:
    """Outputs: (chatbot, readout, memory plot, note)."""
    text = document_text(pasted, file, ctx.settings.max_upload_chars)
    question = (question or "").strip() or DEFAULT_QUESTION
    sid, conv = open_conversation(ctx, request, preset, precision, SLOT, progress)
    conv.clear()  # a new document starts a new conversation
    device = conv.lm.engine.device
    samples: list[tuple[int, int]] = [(0, device_memory(device)[0])]
    total = [0]
    stopped = ctx.stops.arm(sid, SLOT)  # Stop while reading ends the read after the current chunk

    def on_chunk(done: int, of: int) -> None:
        total[0] = of
        samples.append((done, device_memory(device)[0]))
        if stopped.is_set():
            raise ReadStopped

    def tick() -> tuple:
        done = samples[-1][0]
        if total[0]:
            progress(done / total[0], desc=f"Reading {done:,} / {total[0]:,} tokens")
        return gr.skip(), gr.skip(), device_memory_frame(samples, READ_AXIS), _kv_note(done)

    events = conv.send(
        f"{text}\n\n{question}",
        *_greedy(max_new_tokens),
        progress=on_chunk,
        allow_long=True,
        document_chars=len(text),
    )
    first = None
    try:
        for item in _read_in_background(events, tick):
            if isinstance(item, tuple):
                yield item
            else:
                first = item
    except ReadStopped:  # the conversation dropped the unfinished turn: it is empty again
        read = samples[-1][0]
        yield conv.messages, readout_html(None), device_memory_frame(samples, READ_AXIS), (
            f"Stopped after reading {read:,} of {total[0]:,} tokens; nothing was kept. "
            "Press Read and answer to start again."
        )
        return
    except GeneratorExit:  # the page went away mid-read: end the read too, rather than finish it
        stopped.set()
        raise
    note = (
        _kv_note(samples[-1][0]) + f" Falcon Mamba's state: **{fmt_bytes(conv.lm.engine.state_nbytes())}**."
    )
    if first is not None and first.metrics.reused_tokens:
        shared = " (read earlier on this server: prefix states are shared)" if conv.lm.prefix_cache.shared else ""
        note = (f"**Already read{shared}**: {first.metrics.reused_tokens:,} tokens of this document came from "
                f"the prefix cache, so only {first.metrics.prefilled_tokens:,} were read now. " + note)
    yield from _answer(ctx, sid, conv, events, first, device_memory_frame(samples, READ_AXIS), note)


def _answer(ctx, sid, conv, events, first, plot, note) -> Iterator[tuple]:
    for ev in controlled(ctx, sid, SLOT, events, first=first):
        if ev is not None and not ev.done:
            yield conv.messages, readout_html(live_metrics(conv, ev.metrics), streaming=True), plot, note
    yield conv.messages, readout_html(conv.last_metrics), plot, note


@user_errors
def ask(
    ctx: AppContext,
    message: str,
    preset: str,
    precision: str,
    max_new_tokens: int,
    request: gr.Request,
    progress=gr.Progress(),
) -> Iterator[tuple]:
    """A follow-up question about the document read: only the question's tokens are read."""
    text = check_message(message, ctx.settings.max_input_chars)
    if text is None:
        yield (gr.skip(),) * 5
        return
    sid, conv = open_conversation(ctx, request, preset, precision, SLOT, progress)
    if not conv.turns:
        raise gr.Error("Read a document first.")
    events = conv.send(text, *_greedy(max_new_tokens))
    yield "", conv.messages + [{"role": "user", "content": text}], gr.skip(), gr.skip(), gr.skip()
    for out in _answer(ctx, sid, conv, events, None, gr.skip(), gr.skip()):
        yield (gr.skip(), *out)


def build_long_tab(ctx: AppContext) -> None:
    s = ctx.settings
    gr.Markdown(
        f"Paste or upload a long text (up to {s.max_upload_chars:,} characters). It is read in chunks "
        f"of {s.chunk_size} tokens into a fixed-size state, so memory stays flat however long it is; "
        "then ask about it. Follow-up questions continue from that state."
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            pasted = gr.Textbox(
                label="Document",
                lines=8,
                max_lines=16,
                placeholder="Paste a long text here",
                elem_id="long-text",
            )
            upload = gr.File(label="...or upload a .txt / .md file", file_types=[".txt", ".md"], height=90)
            question = gr.Textbox(DEFAULT_QUESTION, label="First question about it")
            with gr.Row():
                preset, precision = model_pickers(ctx, s.default_preset)
                max_new = gr.Slider(1, s.max_new_tokens_cap, min(MAX_NEW_TOKENS, s.max_new_tokens), step=1,
                                    label="Max new tokens")
            with gr.Row():
                read_btn = gr.Button("Read and answer", variant="primary", elem_id="long-read")
                stop_btn = gr.Button("Stop", variant="stop")
        with gr.Column(scale=2):
            plot = series_plot(
                DEVICE_COLORS,
                device_memory_frame([], READ_AXIS),
                x=READ_AXIS,
                y="MiB",
                height=260,
                y_lim=[0, None],
                title="Memory while reading (MiB)",
                elem_id="long-memory",
            )
            note = gr.Markdown()
            readout = gr.HTML(readout_html(None))
    chatbot = gr.Chatbot(height=360, label="About the document", elem_id="long-chat")
    with gr.Row():
        msg = gr.Textbox(placeholder="Ask a follow-up question", show_label=False, scale=6)
        ask_btn = gr.Button("Ask", scale=1, min_width=80)

    preset.input(bind(on_preset_change, s), preset, precision, api_name="long_precisions")
    read_btn.click(
        limited(bind(read_document, ctx)),
        [pasted, upload, question, preset, precision, max_new],
        [chatbot, readout, plot, note],
        api_name="long_read",
        concurrency_limit=reply_concurrency(ctx),
    )
    for trigger, name in ((msg.submit, "long_ask"), (ask_btn.click, "long_ask_button")):
        trigger(
            limited(bind(ask, ctx)),
            [msg, preset, precision, max_new],
            [msg, chatbot, readout, plot, note],
            api_name=name,
            concurrency_limit=reply_concurrency(ctx),
        )
    stop_btn.click(bind(stop_reply, ctx, SLOT), None, None, api_name="long_stop", queue=False)
