"""The app's event handlers, called as plain functions on the tiny checkpoints (no browser).

Each handler gets a gr.Request with a session hash, as Gradio would pass it, and the real
ModelManager / SessionStore / engine behind it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import platform
import re
import threading
import typing
import weakref

import gradio as gr
import pytest
import torch
from tiny_fixtures import bundled_checkpoint, random_checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fm_demo import lab
from fm_demo.conversations.sessions import ConversationBusy, ConversationError, ImportRefused
from fm_demo.conversations.store import SessionStore
from fm_demo.engine import Engine, StateError
from fm_demo.metrics import KVReference
from fm_demo.models import ModelLoadError, ModelManager
from fm_demo.serving import SchedulerBusy, SchedulerClosed
from fm_demo.settings import Settings, SettingsError
from fm_demo.ui import api, chat_tab, compare_tab, long_tab, system_tab
from fm_demo.ui.common import AppContext, fmt_bytes, stop_reply, throttle, to_user_error
from fm_demo.ui.inputs import Sampling, bind
from fm_demo.ui.readout import DEVICE_SERIES, KV_SERIES, MAMBA_SERIES, readout_html

N = 12  # new tokens per reply: short replies keep the suite fast


def tiny_context(settings: Settings, tmp_path_factory) -> AppContext:
    """An AppContext whose tiny presets load the bundled checkpoints."""
    presets = dict(settings.presets())
    for key in ("tiny-base", "tiny-instruct"):
        kind = key.split("-")[1]
        presets[key] = dataclasses.replace(presets[key], source=bundled_checkpoint(kind))
    manager = ModelManager(settings, presets=presets)
    return AppContext(settings, manager, SessionStore(settings, manager))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return tiny_context(
        Settings(device="cpu", max_new_tokens=N, max_input_chars=2000, max_upload_chars=50_000),
        tmp_path_factory,
    )


def request(sid: str) -> gr.Request:
    return gr.Request(session_hash=sid)


def sampling(max_new=N, temperature=0.0) -> Sampling:
    return Sampling(temperature=temperature, top_p=1.0, top_k=0, repetition_penalty=1.0,
                    max_new_tokens=max_new, seed=0)


def knobs(max_new=N, temperature=0.0) -> chat_tab.Knobs:
    return chat_tab.Knobs("tiny-instruct", "fp32", "", sampling(max_new, temperature))


def drain(gen):
    return list(gen)


def test_throttle_limits_rate_and_keeps_first_and_last():
    times = iter(i / 4 for i in range(1000))  # an event every 250 ms, by the throttle's own clock
    out = list(throttle(range(1000), hz=1, is_last=lambda e: e == 999, clock=lambda: next(times)))
    assert out == [*range(0, 1000, 4), 999]  # one a second, and the last
    out = list(throttle(range(1000), hz=10, clock=lambda: 0.0))  # all at once, none marked last
    assert out == [0, 999]  # the first, and the last still pending when the events end


def test_streaming_replies_share_one_update_rate():
    from fm_demo.ui.common import TOTAL_UPDATES_PER_S, UPDATES_PER_S, StreamCount

    streams = StreamCount()
    assert streams.hz() == UPDATES_PER_S
    streams.add(16)
    assert streams.hz() == TOTAL_UPDATES_PER_S / 16 < UPDATES_PER_S  # 16 replies: fewer updates each
    times = iter(i / 8 for i in range(800))  # an event every 125 ms
    out = list(throttle(range(800), hz=streams.hz, is_last=lambda e: e == 799, clock=lambda: next(times)))
    assert out[:3] == [0, 3, 6] and out[-1] == 799  # 3.75 Hz: every third event
    streams.add(-16)
    assert streams.hz() == UPDATES_PER_S


def test_empty_message_does_nothing(ctx):
    outs = drain(chat_tab.send(ctx, "   ", knobs(), [], request=request("empty")))
    assert len(outs) == 1 and all(o == gr.skip() for o in outs[0])
    assert ctx.store.get("empty", "chat") is None  # no conversation created, no model touched


def test_oversized_message_is_refused_with_a_clear_message(ctx):
    with pytest.raises(gr.Error, match="limit is 2,000"):
        drain(chat_tab.send(ctx, "x" * 2001, knobs(), [], request=request("big")))


def test_send_streams_then_second_turn_reuses_the_state(ctx):
    sid = "two-turns"
    outs = drain(chat_tab.send(ctx, "Hello!", knobs(), [], request=request(sid)))
    box, chat, html, mem, speed, points = outs[-1][:6]
    assert outs[0][0] == "" and chat[0] == {"role": "user", "content": "Hello!"}
    assert chat[-1]["role"] == "assistant" and len(points) == 1
    # one turn already draws lines: the state and the KV cache from an empty context, and each
    # rate over the span of context it covered
    assert mem[mem["series"] == KV_SERIES]["context tokens"].tolist() == [0, points[0]["context"]]
    for series in ("prefill", "decode"):
        span = speed[speed["series"] == series]
        assert len(span) == 2 and span["tokens/s"].nunique() == 1 and span["context tokens"].is_monotonic_increasing
    assert speed[speed["series"] == "decode"]["context tokens"].iloc[-1] == points[0]["context"]
    assert "Tokens in context" in html and "Llama-3-8B / Mistral-7B" in html
    conv = ctx.store.get(sid, "chat")
    first_context = conv.context_tokens
    assert conv.last_metrics.reused_tokens == 0 and 1 <= conv.last_metrics.new_tokens <= N

    outs = drain(chat_tab.send(ctx, "And one more thing?", knobs(), points, request=request(sid)))
    box, chat, html, mem, speed, points = outs[-1][:6]
    m = conv.last_metrics
    assert m.reused_tokens == first_context  # the whole first exchange came from the cached state
    assert m.prefilled_tokens < 20  # only the new turn was read
    assert [p["context"] for p in points] == [first_context, conv.context_tokens]
    assert len(speed) == 8  # two turns, each a prefill span and a decode span
    # the state against the KV cache on their own axis: one stays flat, the other grows from zero
    assert set(mem["series"]) == {MAMBA_SERIES, KV_SERIES}
    state, kv = (mem[mem["series"] == s]["MiB"] for s in (MAMBA_SERIES, KV_SERIES))
    assert state.nunique() == 1 and kv.iloc[2] > kv.iloc[1] > state.iloc[0] > kv.iloc[0] == 0
    device = chat_tab.device_plot(points)  # whole-process memory: a plot of its own
    assert set(device["series"]) == {DEVICE_SERIES} and len(device) == 2 and chat_tab.device_plot([]) is None


@pytest.fixture(scope="module")
def rambling_ctx(tmp_path_factory):
    """tiny-instruct backed by random weights: greedy, it never ends a reply by itself, so a stop is
    what ends it (the trained model answers in a few tokens, which can finish before any stop)."""
    settings = Settings(device="cpu", max_new_tokens=N)
    presets = dict(settings.presets())
    presets["tiny-instruct"] = dataclasses.replace(
        presets["tiny-instruct"], source=random_checkpoint("instruct", tmp_path_factory))
    manager = ModelManager(settings, presets=presets)
    return AppContext(settings, manager, SessionStore(settings, manager))


def test_stop_ends_a_long_reply_and_keeps_what_was_shown(rambling_ctx):
    ctx, sid = rambling_ctx, "stopper"
    gen = chat_tab.send(ctx, "Tell me a long story.", knobs(max_new=400), [], request=request(sid))
    seen = 0
    for out in gen:
        seen += 1
        if seen == 3:
            stop_reply(ctx, chat_tab.SLOT, request(sid))
    conv = ctx.store.get(sid, "chat")
    m = conv.last_metrics
    assert m.finish_reason == "cancelled" and 0 < m.new_tokens < 400
    assert conv.context_tokens == len(conv.turns[0].prompt_ids) + m.new_tokens
    assert conv.messages[-1]["content"] == conv.turns[0].reply  # the text shown is what was kept


def test_stop_ends_both_compare_replies_and_keeps_what_each_showed(rambling_ctx):
    ctx, sid = rambling_ctx, "compare-stopper"
    panes = ("tiny-instruct", "fp32") * 2
    gen = compare_tab.compare(ctx, "Tell me a story.", *panes, sampling(max_new=400), request=request(sid))
    for seen, _ in enumerate(gen, start=1):
        if seen == 3:
            stop_reply(ctx, compare_tab.SLOT, request(sid))
    for side in compare_tab.SLOTS:
        conv = ctx.store.get(sid, side)
        m = conv.last_metrics
        assert m.finish_reason == "cancelled" and 0 < m.new_tokens < 400
        assert conv.messages[-1]["content"] == conv.turns[0].reply


def test_the_api_replies_are_as_long_as_the_servers_default_unless_asked(rambling_ctx):
    ctx, story = rambling_ctx, "Tell me a long story about a fox."  # greedy, it runs for 1,264 tokens
    drain(api.chat(ctx, story, request=request("api-default")))
    assert ctx.store.get("api-default", "chat").last_metrics.new_tokens == ctx.settings.max_new_tokens == N
    drain(api.compare(ctx, story, left_preset="tiny-instruct", right_preset="tiny-instruct",
                      request=request("api-default")))
    replies = [ctx.store.get("api-default", side).last_metrics for side in compare_tab.SLOTS]
    assert [m.new_tokens for m in replies] == [N, N]
    drain(api.chat(ctx, story, max_new_tokens=5, request=request("api-asked")))
    assert ctx.store.get("api-asked", "chat").last_metrics.new_tokens == 5


def test_bind_spreads_an_input_group_into_its_fields_and_hands_the_handler_the_group():
    def handler(ctx, message: str, knobs: chat_tab.Knobs, points: list, request: gr.Request,
                progress=gr.Progress()):
        return ctx, message, knobs, points, request

    bound = bind(handler, "the context")
    assert list(inspect.signature(bound).parameters) == [
        "message", "preset", "precision", "system", "temperature", "top_p", "top_k", "repetition_penalty",
        "max_new_tokens", "seed", "json_schema", "replies", "points", "request", "progress"]
    hints = typing.get_type_hints(bound)  # what Gradio reads to inject the request
    assert hints["request"] is gr.Request and hints["top_k"] is int and hints["points"] is list
    sent = request("bound")
    knobs = chat_tab.Knobs("tiny-instruct", "fp32", "Be brief.", Sampling(0.5, 0.8, 40, 1.2, 64, 7), "{}", 3)
    assert bound("Hi", "tiny-instruct", "fp32", "Be brief.", 0.5, 0.8, 40, 1.2, 64, 7, "{}", 3, [1], sent) == (
        "the context", "Hi", knobs, [1], sent)


def test_retry_undo_clear(ctx):
    sid = "edits"
    drain(chat_tab.send(ctx, "First question", knobs(), [], request=request(sid)))
    drain(chat_tab.send(ctx, "Second question", knobs(), [], request=request(sid)))
    conv = ctx.store.get(sid, "chat")
    before, replaced = conv.context_tokens, conv.last_metrics.new_tokens
    outs = drain(chat_tab.retry(ctx, knobs(temperature=1.0), [], request=request(sid)))
    assert len(outs[-1][1]) == 4 and conv.last_metrics.prefilled_tokens == 1  # retry reads one token
    assert conv.context_tokens == before - replaced + conv.last_metrics.new_tokens

    box, chat, *_ = chat_tab.undo(ctx, "tiny-instruct", "fp32", [], request=request(sid))
    assert box == "Second question" and len(chat) == 2 and len(conv.turns) == 1

    box, chat, html, *_ = chat_tab.clear(ctx, request=request(sid))
    assert chat == [] and ctx.store.get(sid, "chat") is None and "Send a message" in html


def test_edit_replays_from_the_edited_message(ctx):
    sid = "editor"
    drain(chat_tab.send(ctx, "One", knobs(), [], request=request(sid)))
    drain(chat_tab.send(ctx, "Two", knobs(), [], request=request(sid)))
    data = gr.EditData(None, {"index": 0, "value": "Uno", "previous_value": "One"})
    outs = drain(chat_tab.edit(ctx, knobs(), [], edit_data=data, request=request(sid)))
    chat = outs[-1][1]
    assert [m["content"] for m in chat if m["role"] == "user"] == ["Uno"] and len(chat) == 2


def test_export_then_import_restores_the_conversation(ctx):
    drain(chat_tab.send(ctx, "Remember this", knobs(), [], request=request("exporter")))
    path = chat_tab.export(ctx, "tiny-instruct", "fp32", request=request("exporter")).value
    if isinstance(path, dict):
        path = path["path"]
    outs = chat_tab.import_file(ctx, path, request=request("importer"))
    original = ctx.store.get("exporter", "chat")
    imported = ctx.store.get("importer", "chat")
    assert outs[1] == original.messages and imported.context_tokens == original.context_tokens


def test_an_old_export_is_swept_and_a_fresh_one_kept(ctx):
    """Exports go to the app's one folder; each export first deletes the files there older than
    FM_DEMO_TEMP_FILE_AGE_S."""
    import os
    import time

    old, fresh = ctx.exports / "conversation-old.fmconv", ctx.exports / "conversation-fresh.fmconv"
    old.write_bytes(b"old"), fresh.write_bytes(b"fresh")
    past = time.time() - ctx.settings.temp_file_age_s - 60
    os.utime(old, (past, past))
    drain(chat_tab.send(ctx, "Keep this", knobs(), [], request=request("sweeper")))
    before = set(ctx.exports.iterdir())
    for _ in range(2):
        chat_tab.export(ctx, "tiny-instruct", "fp32", request=request("sweeper"))
    assert not old.exists() and fresh.exists()
    written = set(ctx.exports.iterdir()) - before
    assert len(written) == 2 and all(p.suffix == ".fmconv" and p.stat().st_size > 0 for p in written)


def test_import_refuses_a_foreign_file(ctx, tmp_path):
    bad = tmp_path / "not-a-conversation.fmconv"
    bad.write_bytes(b"hello, not a safetensors file")
    with pytest.raises(gr.Error, match="not a conversation file"):
        chat_tab.import_file(ctx, str(bad), request=request("bad-import"))


def test_compare_streams_both_panes_with_their_own_states(ctx):
    sid = "comparer"
    args = ["tiny-base", "fp32", "tiny-instruct", "fp32", sampling()]
    outs = drain(compare_tab.compare(ctx, "Hi both", *args, request=request(sid)))
    box, left, right, lhtml, rhtml = outs[-1]
    assert left[-1]["role"] == "assistant" and right[-1]["role"] == "assistant"
    assert "tiny-base" in lhtml and "tiny-instruct" in rhtml
    drain(compare_tab.compare(ctx, "Again", *args, request=request(sid)))
    for side in ("left", "right"):
        assert ctx.store.get(sid, side).last_metrics.reused_tokens > 0


def test_long_context_reads_in_chunks_then_answers_follow_ups(ctx):
    sid = "reader"
    doc = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(300))
    outs = drain(long_tab.read_document(ctx, doc, None, "", "tiny-instruct", "fp32", N, request=request(sid)))
    chat, html, plot, note = outs[-1]
    conv = ctx.store.get(sid, "long")
    assert conv.context_tokens > 2 * ctx.settings.chunk_size  # read in several chunks
    assert len(plot) >= 3 and plot["tokens read"].iloc[-1] > 0  # one memory sample per chunk
    assert "KV cache" in note and chat[-1]["role"] == "assistant"
    before = conv.context_tokens
    drain(long_tab.ask(ctx, "What animal jumps?", "tiny-instruct", "fp32", N, request=request(sid)))
    assert conv.last_metrics.reused_tokens == before


@pytest.mark.parametrize("shared", [False, True])
def test_a_document_read_by_one_session_is_not_read_again_when_sharing_is_on(tmp_path_factory, shared):
    ctx = tiny_context(Settings(device="cpu", max_new_tokens=N, max_upload_chars=50_000, share_prefix_cache=shared),
                       tmp_path_factory)
    doc = " ".join(f"Line {i}: the falcon flies over the desert at dawn." for i in range(120))
    first = drain(long_tab.read_document(ctx, doc, None, "What flies?", "tiny-instruct", "fp32", N,
                                         request=request("alice")))[-1]
    second = drain(long_tab.read_document(ctx, doc, None, "When does it fly?", "tiny-instruct", "fp32", N,
                                          request=request("bob")))[-1]
    a, b = ctx.store.get("alice", "long"), ctx.store.get("bob", "long")
    assert "Already read" not in first[3] and a.last_metrics.reused_tokens == 0
    if shared:  # bob reads only his question: the document's state came from alice's read
        assert second[3].startswith("**Already read (read earlier on this server")
        assert b.last_metrics.reused_tokens == b.turns[0].keep_at > 0.9 * b.context_tokens - N
        assert b.last_metrics.prefilled_tokens < 20
    else:  # sessions never see each other's states
        assert "Already read" not in second[3] and b.last_metrics.reused_tokens == 0


class ReadProbe:
    """long_tab's memory probe, called once before a read and then after each piece of it is
    read: runs the action set for a call, so a test stops or holds a read after a given piece."""

    def __init__(self, probe):
        self.probe, self.calls, self.actions = probe, 0, {}

    def __call__(self, device):
        self.calls += 1
        action = self.actions.pop(self.calls, None)
        if action is not None:
            action()
        return self.probe(device)


def test_stop_while_reading_ends_the_read_and_keeps_nothing(tmp_path_factory, monkeypatch):
    ctx = tiny_context(Settings(device="cpu", max_new_tokens=N, chunk_size=16, max_upload_chars=50_000),
                       tmp_path_factory)
    probe = ReadProbe(long_tab.device_memory)
    monkeypatch.setattr(long_tab, "device_memory", probe)
    sid = "stop-reader"
    doc = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(900))
    probe.actions[1 + 3] = lambda: stop_reply(ctx, long_tab.SLOT, request(sid))  # Stop after piece 3
    chat, _, plot, note = drain(long_tab.read_document(ctx, doc, None, "", "tiny-instruct", "fp32", N,
                                                       request=request(sid)))[-1]
    conv = ctx.store.get(sid, "long")
    read, total = (int(n.replace(",", "")) for n in re.fullmatch(
        r"Stopped after reading ([\d,]+) of ([\d,]+) tokens; nothing was kept\. "
        r"Press Read and answer to start again\.", note).groups())
    assert len(plot) == 4 and plot["tokens read"].tolist()[-1] == read  # before the read, 3 pieces
    assert 0 < read < total
    assert chat == [] and conv.turns == [] and conv.context_tokens == 0 and not conv.busy
    # a page closed mid-read ends the read as well (the handler is closed, not stopped)
    probe.calls, arrived, release, reader = 0, threading.Event(), threading.Event(), []

    def hold():  # the read waits after its first piece until the page has gone
        reader.append(threading.current_thread())
        arrived.set()
        release.wait()

    probe.actions[1 + 1] = hold
    gen = long_tab.read_document(ctx, doc, None, "", "tiny-instruct", "fp32", N, request=request(sid))
    assert next(gen)[3].startswith("A transformer's KV cache")  # a progress tick while it reads
    assert arrived.wait(60)
    gen.close()
    release.set()
    reader[0].join()
    assert not conv.busy and conv.turns == [] and conv.context_tokens == 0
    # the conversation is usable at once: a document is read to the end and answered
    chat, _, _, note = drain(long_tab.read_document(ctx, doc[:2000], None, "", "tiny-instruct", "fp32", N,
                                                    request=request(sid)))[-1]
    assert "KV cache" in note and chat[-1]["role"] == "assistant" and len(conv.turns) == 1


def test_long_context_refuses_an_oversized_document(ctx):
    with pytest.raises(gr.Error, match="limit is 50,000"):
        drain(
            long_tab.read_document(
                ctx, "y" * 50_001, None, "", "tiny-instruct", "fp32", N, request=request("too-long")
            )
        )


@pytest.mark.parametrize("knob, message", [
    ({"top_p": 0.0}, "Invalid sampling setting: top_p must be a number greater than 0 and at most 1, got 0.0"),
    ({"temperature": -1.0},
     "Invalid sampling setting: temperature must be a number: 0 (greedy) or from 0.01 to 10, got -1.0"),
    ({"seed": "lucky"},
     "Invalid sampling setting: seed must be an integer from 0 to 9223372036854775807, got 'lucky'"),
    ({"max_new_tokens": "9e"}, "Invalid sampling setting: max_new_tokens must be a whole number, got '9e'"),
])
def test_a_sampling_setting_the_engine_refuses_is_named_to_the_user(ctx, knob, message):
    with pytest.raises(gr.Error) as refused:
        drain(api.chat(ctx, "Hi", **{"max_new_tokens": N, **knob}, request=request("bad-knob")))
    assert refused.value.message == message


def test_an_unknown_model_is_named_to_the_user(ctx):
    with pytest.raises(gr.Error) as refused:
        drain(api.chat(ctx, "Hi", preset="gpt-9", request=request("bad-model")))
    assert refused.value.message.startswith("Unknown model 'gpt-9'. Available: tiny-base, tiny-instruct,")


def test_api_chat_and_stats(ctx):
    sid = "api-client"
    replies = drain(api.chat(ctx, "Hi", max_new_tokens=N, request=request(sid)))
    assert replies and replies[-1] == ctx.store.get(sid, "chat").messages[-1]["content"]
    drain(api.chat(ctx, "Again", max_new_tokens=N, request=request(sid)))
    stats = api.stats(ctx, request=request(sid))
    assert stats["turns"] == 2 and stats["last_reply"]["reused_tokens"] > 0
    api.reset(ctx, request=request(sid))
    assert api.stats(ctx, request=request(sid))["turns"] == 0


@pytest.mark.parametrize("error", [
    SettingsError("unknown model preset 'x'"), StateError("the state does not fit this model"),
    ConversationError("nothing to retry: the conversation is empty"), ConversationBusy("a reply is running"),
    ImportRefused("not a conversation file exported by this app"), ModelLoadError("Unknown model 'x'."),
    SchedulerBusy("the server is busy"), SchedulerClosed("the model was unloaded"), MemoryError("no room"),
], ids=lambda e: type(e).__name__)
def test_the_domains_errors_reach_the_user_as_they_are_written(error, caplog):
    assert to_user_error(error).message == str(error)
    assert not caplog.records  # a refusal, not a bug: nothing to log


@pytest.mark.parametrize("error", [KeyError("internal detail"), ValueError("too many values to unpack"),
                                   TypeError("'NoneType' object is not subscriptable")],
                         ids=lambda e: type(e).__name__)
def test_unexpected_errors_are_logged_and_the_user_gets_a_human_message(error, caplog):
    message = to_user_error(error).message
    assert message == (f"Something went wrong on the server ({type(error).__name__}). "
                       "The details are in the server log; try again or reload the page.")
    [record] = caplog.records
    assert record.name == "fm_demo.ui" and record.levelname == "ERROR" and record.exc_info[1] is error


def test_readout_names_the_kv_reference_and_formula():
    from fm_demo.metrics import ReplyMetrics

    html = readout_html(ReplyMetrics(context_tokens=8192, state_bytes=20 << 20, new_tokens=2, decode_s=0.1))
    assert "32 layers x 8 KV heads x 128 dims x 2 B = 128.00 KiB/token x 8,192 tokens" in html
    assert "1.00 GiB" in html  # 8k tokens of the reference KV cache


def test_system_report_lists_versions_and_loaded_models(ctx):
    lm = ctx.manager.get("tiny-instruct", "fp32")
    text, rows, stats = system_tab.system_report(ctx)
    assert f"| python | {platform.python_version()} |" in text
    for name in ("torch", "transformers", "gradio", "gradio_client", "tokenizers"):
        assert f"| {name} | {importlib.metadata.version(name)} |" in text
    assert "(process RSS) |" in text  # the memory line says what it measures on CPU
    [row] = [r for r in rows if r[0] == "Falcon Mamba tiny (instruct, bundled) · fp32 (CPU)"]
    assert row[1:] == [
        "cpu", fmt_bytes(lm.nbytes), f"{lm.load_s:.1f} s",
        "conv: reference, conv_update: reference, scan: reference, state_update: reference, "
        "decode_graph: off (not on CUDA, or FM_DEMO_CUDA_GRAPHS=0)",
        "no fused kernels for device 'cpu'",
        "kernels: no fused kernels for device 'cpu'; chat template: prefix-stable (a turn reads only its new tokens)",
    ]
    assert lm.prefix_stable is True
    assert len(rows) == len(ctx.manager.loaded()) and stats == ctx.store.stats()


def test_system_tab_shows_each_models_scheduler_and_prefix_cache(tmp_path_factory):
    ctx = tiny_context(Settings(device="cpu", max_new_tokens=N, max_batch=4), tmp_path_factory)
    drain(chat_tab.send(ctx, "What is 2 plus 3?", knobs(), [], request=request("sys")))
    lm = ctx.manager.get("tiny-instruct", "fp32")
    conv = ctx.store.get("sys", "chat")
    models, serving, caches = system_tab.live_tables(ctx)  # a model loaded by the chat shows up by itself
    assert len(models) == len(serving) == len(caches) == 1
    assert models[0][0] == serving[0][0] == caches[0][0] == lm.label
    row = dict(zip(system_tab.SERVING_HEADERS, serving[0]))
    assert row["runner"] == "batched" and row["max batch"] == 4 and row["decoding"] == 0
    assert row["decode steps"] == conv.last_metrics.new_tokens and row["last batch"] == 1
    cache = dict(zip(system_tab.CACHE_HEADERS, caches[0]))
    assert cache["states"] == lm.prefix_cache.stats()["states"] == len(conv.cache.refs) >= 2
    assert cache["shared across sessions"] == "no" and cache["evictions"] == 0


def test_similar_transformer_matches_parameter_count_and_grows_its_cache(ctx):
    lm = ctx.manager.get("tiny-instruct", "fp32")
    llama = lab.similar_transformer(lm.model)
    assert abs(lab.n_params(llama) / lab.n_params(lm.model) - 1) < 0.35
    mamba = list(lab.mamba_decode(lm.engine, 64, every=16))
    trans = list(lab.transformer_decode(llama, 64, every=16))
    assert [s.tokens for s in mamba] == [16, 32, 48, 64] == [s.tokens for s in trans]
    assert len({s.cache_bytes for s in mamba}) == 1  # the state never grows
    c = llama.config  # fp32: 4 bytes per K or V value
    per_token = KVReference("similar", c.num_hidden_layers, c.num_key_value_heads,
                            c.hidden_size // c.num_attention_heads, 4).bytes_per_token
    assert [s.cache_bytes for s in trans] == [
        per_token * n for n in (16, 32, 48, 64)
    ]  # one K,V row per token


def test_the_prefill_sweep_doubles_from_half_a_chunk_up_to_the_longest_prompt():
    assert lab.sweep_lengths(256, 1024) == [128, 256, 512, 1024]
    assert lab.sweep_lengths(16, 300) == [64, 128, 256]  # never below the sweep's shortest
    assert lab.sweep_lengths(256, 100) == []  # the handler then asks for a longer prompt
    assert lab.sweep_lengths(16, 1 << 30)[-1] == lab.SWEEP_LONGEST


class LivePeak(TorchDispatchMode):
    """lab.PeakMemory's stand-in: the peak of the bytes held by tensors that ops create while it
    is active, counted exactly from every op (what CUDA's allocator reports; RSS is noisy)."""

    def __init__(self, device=None):
        super().__init__()
        self.held: dict[int, list[int]] = {}  # storage address -> [tensors alive on it, its bytes]
        self.live = self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in self.held:
                    self.held[ptr] = [0, storage.nbytes()]
                    self.live += storage.nbytes()
                    self.peak_bytes = max(self.peak_bytes, self.live)
                self.held[ptr][0] += 1
                weakref.finalize(t, self._release, ptr)
        return out

    def _release(self, ptr: int) -> None:
        entry = self.held[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            del self.held[ptr]
            self.live -= entry[1]


def test_chunked_prefill_peak_stays_flat_while_the_parallel_pass_grows(ctx, monkeypatch):
    monkeypatch.setattr(lab, "PeakMemory", LivePeak)
    engine = ctx.manager.get("tiny-instruct", "fp32").engine
    short, long = lab.prefill_peaks(Engine(engine.model, chunk_size=8), [64, 32], chunk_size=8)
    assert (short.prompt_tokens, long.prompt_tokens, long.chunk_size) == (32, 64, 8)
    assert long.parallel_bytes > 1.9 * short.parallel_bytes  # activations for every position at once
    assert abs(long.chunked_bytes - short.chunked_bytes) < 0.01 * short.chunked_bytes  # one chunk's
    assert long.parallel_bytes > 4 * long.chunked_bytes


def test_peak_memory_is_the_highest_level_above_the_one_at_entry(monkeypatch):
    level, sampled = [100], threading.Event()

    def memory_now(device):
        if level[0] == 500:
            sampled.set()
        return level[0]

    monkeypatch.setattr(lab, "memory_now", memory_now)
    with lab.PeakMemory(torch.device("cpu")) as peak:
        level[0] = 500
        assert sampled.wait(30)  # the sampling thread has seen the high point
        level[0] = 150
    assert peak.peak_bytes == 400


def test_time_limit_stops_a_decode_run_at_its_next_sample(ctx):
    engine = ctx.manager.get("tiny-instruct", "fp32").engine
    samples = list(lab.mamba_decode(engine, 100_000, every=8, time_limit_s=0))  # past it at once
    assert [s.tokens for s in samples] == [8]


def test_lab_handlers_stream_both_series_and_the_prefill_sweep(ctx):
    from fm_demo.ui import lab_tab

    outs = drain(lab_tab.run_decode(ctx, "tiny-instruct", "fp32", 128, 60, request=request("lab")))
    first = outs[0][0]  # Falcon Mamba's samples only: the transformer is named by a row without values
    assert set(first["series"]) == {lab.MAMBA, lab.TRANSFORMER}
    assert first[first["series"] == lab.TRANSFORMER]["tokens/s"].isna().all()
    speed, cache, memory, note = outs[-1]
    assert set(speed["series"]) == {lab.MAMBA, lab.TRANSFORMER} and note.startswith("Done")
    assert speed["tokens/s"].notna().all()  # once both have samples, no placeholder remains
    mamba = cache[cache["series"] == lab.MAMBA]["cache MiB"]
    kv = cache[cache["series"] == lab.TRANSFORMER]["cache MiB"]
    assert mamba.nunique() == 1 and kv.is_monotonic_increasing and kv.iloc[-1] > kv.iloc[0]
    outs = drain(lab_tab.run_prefill(ctx, "tiny-instruct", "fp32", 1024, request=request("lab")))
    frame, note = outs[-1]
    assert sorted(set(frame["prompt tokens"])) == [128, 256, 512, 1024] and note.startswith("Done")
    measured = frame[frame["peak MiB"].notna()]
    assert set(measured["series"]) == {lab_tab.PARALLEL, lab_tab.CHUNKED}  # on the CPU the pass always runs
    assert set(frame["series"]) == set(measured["series"])  # the legend names only what is drawn
    assert "not run" not in note


def test_kernels_check_report_says_which_path_runs():
    report = system_tab.kernels_check_report()
    assert report["engine_paths"]["scan"] == "reference" or report["engine_paths"]["fused"]
    assert "checks" in report


def test_the_chat_replies_as_json_matching_the_schema_in_its_box(ctx):
    """The Chat tab's "Reply as JSON" box: the reply parses and has the schema's fields; a box that
    holds no JSON or an unusable schema is the user's to fix, and the conversation is untouched."""
    import json

    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "unit": {"enum": ["km", "mi"]}},
              "required": ["answer", "unit"], "additionalProperties": False}
    shaped = dataclasses.replace(knobs(max_new=120), json_schema=json.dumps(schema))
    drain(chat_tab.send(ctx, "How far is it from Paris to Rome?", shaped, [], request=request("json-chat")))
    conv = ctx.store.get("json-chat", "chat")
    reply = json.loads(conv.turns[-1].reply)
    assert set(reply) == {"answer", "unit"} and isinstance(reply["answer"], int) and reply["unit"] in ("km", "mi")
    for box, why in (("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"),
                     ('{"type": "no-such-type"}', "cannot be used")):
        with pytest.raises(gr.Error, match=why):
            drain(chat_tab.send(ctx, "Again?", dataclasses.replace(shaped, json_schema=box), [],
                                request=request("json-chat")))
    assert len(conv.turns) == 1
