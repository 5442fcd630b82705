"""Conversations that survive a restart: the history file (SQLite), and the store writing to it and
restoring from it, on the bundled tiny checkpoints.

A "restart" here is a new ModelManager, SessionStore and History on the same file (nothing of the
first server's memory is reachable); test_history_restart.py kills a real `python app.py` instead.
The claim each restart test checks: the restored conversation's next greedy reply is the one the
uninterrupted conversation gives.
"""

from __future__ import annotations

import dataclasses
import re
import sqlite3
import threading

import pytest
from tiny_fixtures import bundled_checkpoint

from fm_demo.conversations.history import History, browser_id
from fm_demo.conversations.sessions import Conversation, ConversationError
from fm_demo.conversations.store import SessionStore
from fm_demo.models import ModelManager
from fm_demo.settings import Settings

N = 24  # new tokens per reply
QUESTIONS = ("Remember the word falcon.", "What is 47 + 35?", "Which word did I ask you to remember?")

pytestmark = pytest.mark.usefixtures("one_thread")


def manager(settings: Settings) -> ModelManager:
    """A fresh model manager (a new process's worth of models) whose tiny presets load the bundled
    checkpoints."""
    presets = dict(settings.presets())
    for key in ("tiny-base", "tiny-instruct"):
        presets[key] = dataclasses.replace(presets[key], source=bundled_checkpoint(key.split("-")[1]))
    return ModelManager(settings, presets=presets)


def settings(tmp_path, **kw) -> Settings:
    return Settings(device="cpu", max_new_tokens=N, history_db=str(tmp_path / "history.sqlite3"), **kw)


def say(conv: Conversation, text: str) -> str:
    for _ in conv.send(text):
        pass
    return conv.turns[-1].reply


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[str]:
    """The replies to QUESTIONS in one conversation that nothing interrupts (history in memory)."""
    s = Settings(device="cpu", max_new_tokens=N)
    conv = SessionStore(s, manager(s)).conversation("one", "tiny-instruct")
    return [say(conv, q) for q in QUESTIONS]


def test_the_history_is_one_sqlite_file_in_wal_mode_whose_rows_belong_to_a_browser(tmp_path):
    path = tmp_path / "deep" / "history.sqlite3"
    h = History(str(path), state_budget=1000)
    assert h.journal_mode() == "wal" and h.persistent
    h.save("c1", "browser-a", "  Tell me\nabout   foxes ", "tiny-instruct", "fp32", "{}", b"s" * 10)
    h.save("c2", "browser-a", "second", "tiny-instruct", "fp32", "{}")
    h.save("c3", "browser-b", "other", "tiny-instruct", "fp32", "{}")
    listed = [(e.id, e.title) for e in h.entries("browser-a")]
    assert listed == [("c2", "second"), ("c1", "Tell me about foxes")]
    assert h.load("c1", "browser-b") is None  # another browser's row is not there for it
    assert not h.rename("c1", "browser-b", "mine") and not h.delete("c1", "browser-b")
    h.save("c1", "browser-b", "hijack", "tiny-instruct", "fp32", '{"x": 1}')  # same id, other browser
    assert h.load("c1", "browser-a").transcript == "{}"  # its row stays as it was
    assert h.rename("c1", "browser-a", "Foxes") and h.delete("c2", "browser-a")
    h.save("c1", "browser-a", "a later first message", "tiny-instruct", "fp32", "{}")  # keeps its title
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        ["history.sqlite3", "history.sqlite3-wal", "history.sqlite3-shm"])
    secret = h.secret()
    h.close()
    again = History(str(path), state_budget=1000)  # what a restarted server opens
    assert [(e.id, e.title) for e in again.entries("browser-a")] == [("c1", "Foxes")]
    assert again.load("c1", "browser-a").state is None  # written again without a state
    assert again.secret() == secret  # the page's localStorage still decrypts
    with sqlite3.connect(path) as db:  # a plain sqlite3 client reads it too
        assert db.execute("SELECT count(*) FROM conversations").fetchone()[0] == 2


def test_states_beyond_the_budget_are_dropped_oldest_first_and_transcripts_stay(tmp_path):
    h = History(str(tmp_path / "h.sqlite3"), state_budget=250)
    assert not h.save("big", "b", "t", "p", "fp32", "[big]", b"x" * 251)  # larger than the whole budget
    for name in ("one", "two", "three"):
        assert h.save(name, "b", name, "p", "fp32", f"[{name}]", b"x" * 100)
    kept = {e.id: h.load(e.id, "b") for e in h.entries("b")}
    assert {k for k, r in kept.items() if r.state is not None} == {"two", "three"}
    assert h.state_bytes() == 200
    assert {r.transcript for r in kept.values()} == {"[big]", "[one]", "[two]", "[three]"}
    assert History("", state_budget=10**9).state_budget == 0  # in memory: transcripts only


def test_writes_from_many_threads_all_land(tmp_path):
    h = History(str(tmp_path / "h.sqlite3"), state_budget=10_000)

    def write(i: int) -> None:
        for j in range(20):
            h.save(f"c{i}-{j}", f"browser-{i % 2}", f"t{j}", "p", "fp32", "{}", b"s" * 50)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(h.entries("browser-0")) + len(h.entries("browser-1")) == 160
    assert h.state_bytes() <= 10_000


def test_the_browser_id_is_made_on_the_server_unless_the_page_has_one_it_handed_out(tmp_path):
    made = {browser_id(v) for v in ("", None, "short", "bad id with spaces" * 3, 42, {"x": 1})}
    assert len(made) == 6 and all(re.fullmatch(r"[A-Za-z0-9_-]{43}", b) for b in made)
    kept = browser_id("A" * 43)
    assert kept == "A" * 43
    s = settings(tmp_path)
    store = SessionStore(s, manager(s))
    assert store.attach("page", "") != store.attach("other-page", "")
    assert store.attach("page-2", kept) == kept
    say(store.conversation("page-2", "tiny-instruct"), "mine")
    other = store.attach("page-2", "B" * 43)  # the same session, now another browser's
    assert store.entries("page-2") == [] and store.conversation("page-2", "tiny-instruct").turns == []
    assert [e.title for e in store.history.entries(kept)] == ["mine"] and store.history.entries(other) == []
    store.reset("early")
    say(store.conversation("early", "tiny-instruct"), "before the page loaded")
    adopted = store.attach("early", "")  # a chat begun before the page's load event becomes its browser's
    assert [e.title for e in store.history.entries(adopted)] == ["before the page loaded"]


def test_a_conversation_is_written_when_its_turn_ends_not_per_token(tmp_path, uninterrupted):
    s = settings(tmp_path)
    store = SessionStore(s, manager(s))
    writes = []
    save = store.history.save
    store.history.save = lambda *a, **kw: writes.append(a[0]) or save(*a, **kw)
    store.attach("page", "")
    conv = store.conversation("page", "tiny-instruct")
    for i, question in enumerate(QUESTIONS[:2]):
        events = 0
        for ev in conv.send(question):
            events += not ev.done
            assert len(writes) == i  # nothing is written while the reply streams
        assert events > 1 and len(writes) == i + 1
    record = store.history.load(conv.history_id, conv.browser)
    assert record.title == QUESTIONS[0] and (record.preset, record.precision) == ("tiny-instruct", "fp32")
    assert [t.reply for t in conv.turns] == uninterrupted[:2]
    assert record.state is not None  # the tiny state (~150 KiB) fits the default budget


@pytest.mark.parametrize("state_bytes", [1 << 30, 0], ids=["with its state", "transcript only"])
def test_after_a_restart_the_browser_gets_its_conversation_back_and_it_continues_as_if_uninterrupted(
        tmp_path, uninterrupted, state_bytes):
    s = settings(tmp_path, history_state_bytes=state_bytes)
    first = SessionStore(s, manager(s))
    browser = first.attach("page", "")
    conv = first.conversation("page", "tiny-instruct")
    for question in QUESTIONS[:2]:
        say(conv, question)
    context = conv.context_tokens
    first.history.close()  # the process ends: only the file is left
    del first, conv

    again = SessionStore(s, manager(s))  # a new process on the same file
    assert again.attach("new-page", browser) == browser
    assert [e.title for e in again.entries("new-page")] == [QUESTIONS[0]]
    conv = again.reopen("new-page")
    assert [t.reply for t in conv.turns] == uninterrupted[:2] and conv.context_tokens == context
    assert again.get("new-page") is conv
    assert say(again.conversation("new-page", "tiny-instruct"), QUESTIONS[2]) == uninterrupted[2]
    m = conv.last_metrics
    if state_bytes:  # resumed from the saved state: only the new message is read
        assert m.reused_tokens == context and m.prefilled_tokens < context
    else:  # rebuilt: the whole transcript read again by chunked prefill, and the readout says so
        assert m.reused_tokens == 0 and m.prefilled_tokens > context
        assert m.rebuilt_tokens == context and not m.cache_hit


def test_evicting_a_session_keeps_its_transcript_and_its_next_reply_continues_it(tmp_path, uninterrupted):
    s = settings(tmp_path, max_sessions=1)
    store = SessionStore(s, manager(s))
    store.attach("a", "")
    first = store.conversation("a", "tiny-instruct")
    say(first, QUESTIONS[0])
    store.attach("b", "")
    say(store.conversation("b", "tiny-instruct"), "Hello")  # the LRU drops session a
    assert store.get("a") is None and store.stats()["dropped_sessions"] == 1
    assert [e.title for e in store.entries("a")] == [QUESTIONS[0]]  # its transcript is still there
    conv = store.conversation("a", "tiny-instruct")  # session a's next request
    assert conv is not first and [t.user for t in conv.turns] == [QUESTIONS[0]]
    assert say(conv, QUESTIONS[1]) == uninterrupted[1] and len(store.entries("a")) == 1


def test_new_open_rename_and_delete_everywhere(tmp_path):
    s = settings(tmp_path)
    store = SessionStore(s, manager(s))
    browser = store.attach("tab-1", "")
    say(store.conversation("tab-1", "tiny-instruct"), "first chat")
    store.new_conversation("tab-1")
    store.attach("tab-1-reloaded", browser)
    assert store.reopen("tab-1-reloaded") is None  # the page had a new chat open: it loads one
    assert store.open_id("tab-1-reloaded") == store.open_id("tab-1")
    assert store.conversation("tab-1", "tiny-instruct").turns == []
    say(store.conversation("tab-1", "tiny-instruct"), "second chat")
    first, second = sorted(store.entries("tab-1"), key=lambda e: e.updated)
    assert (first.title, second.title) == ("first chat", "second chat")
    store.attach("tab-2", browser)  # another tab of the same browser opens the first one
    assert [t.user for t in store.open("tab-2", first.id).turns] == ["first chat"]
    assert store.rename("tab-1", first.id, "Renamed") and store.entries("tab-2")[-1].title == "Renamed"

    stranger = store.attach("stranger", "")
    assert stranger != browser and store.entries("stranger") == []
    with pytest.raises(ConversationError):
        store.open("stranger", first.id)  # another browser's id opens nothing
    assert not store.delete("stranger", first.id) and not store.rename("stranger", first.id, "x")

    assert store.delete("tab-1", first.id)
    assert store.history.load(first.id, browser) is None
    assert [e.id for e in store.entries("tab-1")] == [second.id]
    assert store.get("tab-2") is None  # gone from the memory of the tab that had it open
    assert store.conversation("tab-2", "tiny-instruct").turns == []  # that tab goes on with a new chat
    assert store.conversation("tab-1", "tiny-instruct").turns[0].user == "second chat"  # the other stays


def test_undo_to_nothing_and_import_follow_the_history(tmp_path):
    s = settings(tmp_path)
    store = SessionStore(s, manager(s))
    store.attach("page", "")
    conv = store.conversation("page", "tiny-instruct")
    say(conv, "only message")
    data = conv.export()
    conv.undo()
    store.save(conv)
    assert store.entries("page") == []  # a conversation without a turn is no row
    imported = store.import_bytes("page", data)
    assert [e.title for e in store.entries("page")] == ["only message"]
    assert store.open_id("page") == imported.history_id


def test_a_transcript_another_prompt_format_does_not_write_is_encoded_again(tmp_path, uninterrupted):
    s = settings(tmp_path)
    store = SessionStore(s, manager(s))
    store.attach("page", "")
    conv = store.conversation("page", "tiny-instruct")
    say(conv, QUESTIONS[0])
    record = store.history.load(conv.history_id, conv.browser)
    base = store.manager.get("tiny-base")
    moved = Conversation.restore(base, record.transcript, record.state, s)  # the state is refused too
    assert [(t.user, t.reply) for t in moved.turns] == [(QUESTIONS[0], uninterrupted[0])]
    assert moved.turns[0].prompt_ids != conv.turns[0].prompt_ids  # the base model's own format
    assert say(moved, QUESTIONS[1])  # and it replies from there


def test_the_sidebar_handlers_tie_the_page_to_a_browser_and_refuse_what_is_not_its_own(tmp_path):
    import gradio as gr

    from fm_demo.ui import history_sidebar
    from fm_demo.ui.common import AppContext

    s = settings(tmp_path)
    m = manager(s)
    ctx = AppContext(s, m, SessionStore(s, m))
    page = gr.Request(session_hash="page")
    browser, radio, title, *chat = history_sidebar.load(ctx, "", page)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", browser) and radio.choices == [] and title == ""
    assert chat[1] == []  # an empty chat
    say(ctx.store.conversation("page", "tiny-instruct"), QUESTIONS[0])
    radio, title = history_sidebar.refresh(ctx, page)
    (label, id), = radio.choices
    assert (label, radio.value, title) == (QUESTIONS[0], id, QUESTIONS[0])
    for call in (lambda: history_sidebar.rename(ctx, None, "x", page),
                 lambda: history_sidebar.delete(ctx, None, page),
                 lambda: history_sidebar.rename(ctx, id, "  ", page)):
        with pytest.raises(gr.Error):
            call()
    other = gr.Request(session_hash="other-browser")
    history_sidebar.load(ctx, "", other)
    with pytest.raises(gr.Error, match="no longer in this browser's history"):
        history_sidebar.open_(ctx, id, other)
    again = gr.Request(session_hash="page-reloaded")
    assert history_sidebar.load(ctx, browser, again)[4][0]["content"] == QUESTIONS[0]  # the chat is back
    radio, title, *chat = history_sidebar.delete(ctx, id, again)
    assert radio.choices == [] and chat[1] == [] and ctx.store.get("page") is None
