"""The chat tab's exploring handlers as plain functions on the tiny checkpoints: the reply controls
(switch, new chat, compare from here), Show N replies, the token view and a rewind; and the page
data they take refused with a message when it is hostile, the conversation left as it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import gradio as gr
import pytest
from test_ui_handlers import drain, knobs, request, tiny_context

from fm_demo.settings import Settings
from fm_demo.ui import chat_tab, explore

N = 12


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return tiny_context(Settings(device="cpu", max_new_tokens=N), tmp_path_factory)


def event(**data) -> gr.EventData:
    return gr.EventData(None, data)


def hot() -> chat_tab.Knobs:
    return dataclasses.replace(knobs(N, temperature=2.5), replies=3)


def act(ctx, sid, **data) -> tuple:
    return chat_tab.act(ctx, [], False, None, event(**data), request(sid))


def test_switch_new_chat_and_compare_from_a_reply(ctx):
    sid = "explore-act"
    drain(chat_tab.send(ctx, "What is 47 + 35?", knobs(), [], request=request(sid)))
    drain(chat_tab.retry(ctx, knobs(N, 2.5), [], request=request(sid)))
    conv = ctx.store.get(sid, "chat")
    assert json.loads(explore.branch_data(conv)) == [{"turn": 0, "k": 2, "n": 2}]
    outs = act(ctx, sid, action="switch", turn=0, version=0)
    assert len(outs) == 18 and "0 tokens read" in outs[2] and "version 1 of 2 shown" in outs[2]
    assert json.loads(outs[6]) == [{"turn": 0, "k": 1, "n": 2}]
    drain(chat_tab.send(ctx, "Remember the word falcon.", knobs(), [], request=request(sid)))
    outs = act(ctx, sid, action="newchat", turn=0)
    new = ctx.store.get(sid, "chat")
    assert new is not conv and len(new.turns) == 1 and outs[1] == new.messages
    outs = act(ctx, sid, action="compare", turn=0)
    left, right = ctx.store.get(sid, "left"), ctx.store.get(sid, "right")
    assert left.token_ids() == right.token_ids() == new.token_ids()
    assert outs[9] == left.messages and "reads only itself" in outs[11] and outs[-1].selected == "compare"
    compare_tab_send(ctx, sid)
    history = new.context_tokens
    for pane in (left, right):  # both continue without reading the history again
        m = pane.last_metrics
        assert m.reused_tokens >= history and m.prefilled_tokens <= len(pane.turns[-1].prompt_ids) and m.cache_hit


def compare_tab_send(ctx, sid):
    from fm_demo.ui import compare_tab
    from fm_demo.ui.inputs import Sampling

    s = Sampling(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=N, seed=0)
    return drain(compare_tab.compare(ctx, "Which word did I ask you to remember?", "tiny-instruct", "fp32",
                                     "tiny-instruct", "fp32", s, request=request(sid)))


def test_show_n_replies_streams_them_side_by_side_and_a_pick_switches(ctx):
    sid = "explore-many"
    outs = drain(chat_tab.send(ctx, "Write a poem about the sea.", hot(), [], request=request(sid)))
    conv = ctx.store.get(sid, "chat")
    final = outs[-1][6]
    assert final.visible and final.value.count("fm-many-col") == 3 and "Shown in the chat" in final.value
    assert "Replies from one read" in outs[-1][2]
    assert conv.branch_points() == {0: (1, 3)}
    outs = chat_tab.act(ctx, [], False, None, event(action="switch", turn=0, version=2), request(sid))
    assert conv.branch_points() == {0: (3, 3)} and "data-version='2'" in outs[8]
    assert re.search(r"fm-many-col fm-shown' data-version='2'", outs[8])


def test_the_token_view_sums_to_one_and_a_rewind_continues_from_the_token(ctx):
    sid = "explore-tokens"
    drain(chat_tab.send(ctx, "Write a poem about the sea.", knobs(), [], request=request(sid)))
    conv = ctx.store.get(sid, "chat")
    page = explore.token_view_html(conv, None)
    assert page.count("class='fm-tok'") == len(conv.turns[0].reply_ids)
    for pos in range(len(conv.turns[0].reply_ids)):
        rows, rest = explore.alternatives(conv.turns[0], pos)
        assert math.isclose(sum(p for _, p in rows) + rest, 1.0, abs_tol=1e-6)
    turn = conv.turns[0]
    alt = next(t for t, _ in turn.logprobs[2][1] if t != turn.reply_ids[2] and t not in conv.stop_ids())
    assert f"data-pos='2' data-token='{alt}'" in page
    outs = drain(chat_tab.rewind(ctx, knobs(), [], event(action="rewind", turn=0, pos=2, token=alt),
                                 request=request(sid)))
    assert conv.turns[0].reply_ids[:3] == turn.reply_ids[:2] + [alt] and "4 tokens read" in outs[-1][2]
    assert conv.branch_points() == {0: (2, 2)}


@pytest.mark.parametrize("data, message", [
    ({}, "unknown action"),
    ({"action": "drop-table", "turn": 0}, "unknown action"),
    ({"action": "switch", "turn": "0; rm", "version": 0}, "turn is not a whole number"),
    ({"action": "switch", "turn": 0, "version": 1e300}, "has 2 versions"),
    ({"action": "switch", "turn": 0, "version": float("nan")}, "not a whole number"),
    ({"action": "switch", "turn": 0, "version": True}, "not a whole number"),
    ({"action": "switch", "turn": 7, "version": 0}, "no other versions"),
    ({"action": "switch", "turn": -1, "version": 0}, "no other versions"),
    ({"action": "newchat", "turn": 99}, "no turn 99"),
    ({"action": "compare", "turn": -5}, "no turn"),
])
def test_hostile_page_data_gets_a_message_and_changes_nothing(ctx, data, message):
    sid = "explore-hostile"
    if ctx.store.get(sid, "chat") is None:
        drain(chat_tab.send(ctx, "What is 47 + 35?", knobs(), [], request=request(sid)))
        drain(chat_tab.retry(ctx, knobs(N, 2.5), [], request=request(sid)))
    conv = ctx.store.get(sid, "chat")
    before = (conv.token_ids(), conv.branch_points())
    with pytest.raises(gr.Error, match=message):
        chat_tab.act(ctx, [], False, None, gr.EventData(None, data), request(sid))
    assert (conv.token_ids(), conv.branch_points()) == before and ctx.store.get(sid, "chat") is conv


@pytest.mark.parametrize("data, message", [
    ({"action": "switch", "turn": 0, "pos": 0, "token": 1}, "unknown action"),
    ({"action": "rewind", "turn": 0, "pos": 10_000, "token": 5}, "no token"),
    ({"action": "rewind", "turn": 0, "pos": 0, "token": -3}, "not a token"),
    ({"action": "rewind", "turn": 0, "pos": 0, "token": "x"}, "not a whole number"),
    ({"action": "rewind", "turn": 3, "pos": 0, "token": 5}, "no reply 4"),
])
def test_hostile_rewinds_are_refused(ctx, data, message):
    sid = "explore-hostile-rewind"
    if ctx.store.get(sid, "chat") is None:
        drain(chat_tab.send(ctx, "What is 47 + 35?", knobs(), [], request=request(sid)))
    conv = ctx.store.get(sid, "chat")
    before = conv.token_ids()
    with pytest.raises(gr.Error, match=message):
        drain(chat_tab.rewind(ctx, knobs(), [], gr.EventData(None, data), request=request(sid)))
    assert conv.token_ids() == before and conv.branch_points() == {}


def test_show_n_replies_with_greedy_decoding_says_why_not(ctx):
    with pytest.raises(gr.Error, match="temperature above 0"):
        drain(chat_tab.send(ctx, "hi", dataclasses.replace(knobs(), replies=3), [], request=request("greedy-n")))
    with pytest.raises(gr.Error, match="1 to 4"):
        drain(chat_tab.send(ctx, "hi", dataclasses.replace(knobs(), replies=9), [], request=request("greedy-n")))


def test_actions_on_a_page_without_a_conversation_say_so(ctx):
    with pytest.raises(gr.Error, match="no longer open"):
        chat_tab.act(ctx, [], False, None, event(action="switch", turn=0, version=0), request("nobody"))
