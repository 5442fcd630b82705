"""The history sidebar: this browser's chat conversations, to start a new one, open, rename or
delete one (the history itself: conversations/history.py).

The page keeps a random browser id in localStorage (gr.BrowserState, encrypted with a key the
history file keeps, so the page still reads it after a restart). When the page loads it sends the
id; the server makes one with secrets.token_urlsafe when the page has none (or one it never hands
out), ties the session to it (store.attach) and opens the conversation that browser had open. The id is
the only key to a browser's conversations: unguessable, never checked as a password.

Every handler returns the list and the title box first; those that open a conversation then the
chat tab's outputs (chat_tab.shown). gradio_client can call them too: /history_load with an id
of the client's own (or "" for a new one) gives a client the same history as a browser.
"""

from __future__ import annotations

import gradio as gr

from .chat_tab import ChatView, shown
from .common import AppContext, session_id, user_errors
from .inputs import bind

STORAGE_KEY = "fm-demo-browser"
KEPT = {
    True: "Kept on this server: they come back after a restart, in this browser.",
    False: "Kept in the server's memory: a restart forgets them (set FM_DEMO_HISTORY_DB to keep them).",
}


def listing(ctx: AppContext, sid: str) -> tuple:
    """The list of the session's browser's conversations, the open one selected, and its title."""
    entries, open_id = ctx.store.entries(sid), ctx.store.open_id(sid)
    current = next((e for e in entries if e.id == open_id), None)
    radio = gr.Radio(choices=[(e.title, e.id) for e in entries], value=current.id if current else None)
    return radio, current.title if current else ""


@user_errors
def load(ctx: AppContext, browser: str | None, request: gr.Request) -> tuple:
    """The page opened: the browser's id (a new one when it has none), and the conversation it had
    open (an empty chat when that was a new one)."""
    sid = session_id(request)
    browser = ctx.store.attach(sid, browser)
    conv = ctx.store.reopen(sid)
    if conv is None:  # a page just loaded: its plots keep their first value (no data, series named)
        box, chat, readout, *rest = shown(ctx, None)
        return browser, *listing(ctx, sid), box, chat, readout, *(gr.skip() for _ in rest)
    return browser, *listing(ctx, sid), *shown(ctx, conv)


@user_errors
def refresh(ctx: AppContext, request: gr.Request) -> tuple:
    """The list again, after a turn ended or the chat was undone, cleared or imported."""
    return listing(ctx, session_id(request))


@user_errors
def new(ctx: AppContext, request: gr.Request) -> tuple:
    """An empty chat; the conversation that was open stays in the list."""
    sid = session_id(request)
    ctx.store.new_conversation(sid)
    return *listing(ctx, sid), *shown(ctx, None)


@user_errors
def open_(ctx: AppContext, conversation: str | None, request: gr.Request) -> tuple:
    """Open the conversation picked in the list, on the model it was written with."""
    sid = session_id(request)
    if not conversation:
        return (gr.skip(),) * 10
    conv = ctx.store.open(sid, conversation)
    return *listing(ctx, sid), *shown(ctx, conv)


@user_errors
def rename(ctx: AppContext, conversation: str | None, title: str, request: gr.Request) -> tuple:
    """Give the selected conversation the title in the box."""
    if not conversation:
        raise gr.Error("Pick a conversation in the list first.")
    if not (title or "").strip():
        raise gr.Error("A title cannot be empty.")
    sid = session_id(request)
    if not ctx.store.rename(sid, conversation, title):
        raise gr.Error("That conversation is no longer in this browser's history.")
    return listing(ctx, sid)


@user_errors
def delete(ctx: AppContext, conversation: str | None, request: gr.Request) -> tuple:
    """Delete the selected conversation everywhere: the history and every page that has it open.
    The chat shows a new conversation when the deleted one was open here."""
    if not conversation:
        raise gr.Error("Pick a conversation in the list first.")
    sid = session_id(request)
    was_open = ctx.store.open_id(sid) == conversation
    ctx.store.delete(sid, conversation)
    return *listing(ctx, sid), *(shown(ctx, None) if was_open else (gr.skip(),) * 8)


def build_history_sidebar(ctx: AppContext, demo: gr.Blocks, chat: ChatView) -> None:
    """The sidebar, and the page-load event that ties the page to its browser's history."""
    browser = gr.BrowserState("", storage_key=STORAGE_KEY, secret=ctx.store.history.secret())
    with gr.Sidebar(label="Conversations", open=True, elem_id="history", width=280):
        new_btn = gr.Button("New conversation", variant="primary", size="sm", elem_id="history-new")
        conversations = gr.Radio([], label="This browser's conversations", elem_id="history-list",
                                 elem_classes=["fm-history"])
        title = gr.Textbox(label="Title", max_lines=1, elem_id="history-title")
        with gr.Row():
            rename_btn = gr.Button("Rename", size="sm", elem_id="history-rename")
            delete_btn = gr.Button("Delete", variant="stop", size="sm", elem_id="history-delete")
        gr.Markdown(KEPT[ctx.store.history.persistent], elem_id="history-note")
    side = [conversations, title]
    opens = [
        demo.load(bind(load, ctx), browser, [browser, *side, *chat.shows], api_name="history_load"),
        new_btn.click(bind(new, ctx), None, [*side, *chat.shows], api_name="history_new"),
        conversations.input(bind(open_, ctx), conversations, [*side, *chat.shows], api_name="history_open"),
        delete_btn.click(bind(delete, ctx), conversations, [*side, *chat.shows], api_name="history_delete"),
    ]
    for event in opens:  # the opened conversation's reply controls and token view
        event.then(*chat.refresh, api_visibility="private", show_progress="hidden")
    rename_btn.click(bind(rename, ctx), [conversations, title], side, api_name="history_rename")
    title.submit(bind(rename, ctx), [conversations, title], side, api_name="history_rename_enter")
    for event in chat.changes:
        event.then(bind(refresh, ctx), None, side, api_visibility="private", show_progress="hidden")
