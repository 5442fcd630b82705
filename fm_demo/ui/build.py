"""build_demo(settings): the whole Gradio app. One call lays out every tab and wires its events.

The model manager and the session store are created here and closed over by the handlers;
nothing lives in module globals, so several demos (tests) can coexist in one process.
"""

from __future__ import annotations

import os

import gradio as gr

from ..settings import Settings
from .api import MCP_TOOLS, register_api
from .chat_tab import build_chat_tab, connect_compare
from .common import AppContext, delete_cache, session_id
from .compare_tab import build_compare_tab
from .history_sidebar import build_history_sidebar
from .inputs import bind
from .lab_tab import build_lab_tab
from .limits import LAB, LIMITED, admission
from .long_tab import build_long_tab
from .explore import CSS as EXPLORE_CSS
from .readout import CSS
from .system_tab import build_system_tab, system_report
from .theme import CSS as THEME_CSS
from .theme import HEAD, theme

TITLE = "Falcon Mamba: attention-free chat"
INTRO = (
    "**Falcon Mamba** is a 7B language model with no attention: a fixed-size recurrent state replaces "
    "the KV cache. Here every conversation keeps its state on the server, so each turn reads only its "
    "new tokens, and speed and memory stay flat however long the conversation grows."
)


def offline_environment() -> None:
    """No telemetry and no network calls from Gradio at launch (update check, analytics)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_TELEMETRY_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def make_context(settings: Settings) -> AppContext:
    from ..conversations.store import SessionStore
    from ..models import ModelManager

    manager = ModelManager(settings)
    return AppContext(settings, manager, SessionStore(settings, manager))


def build_demo(settings: Settings | None = None, ctx: AppContext | None = None) -> gr.Blocks:
    offline_environment()
    settings = settings or Settings.from_env()
    ctx = ctx or make_context(settings)
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=delete_cache(settings)) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        # First: Gradio names an MCP tool after its function and numbers later namesakes (the
        # compare tab's handler is also called compare), so the tools keep their plain names.
        register_api(ctx)
        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="chat"):
                chat = build_chat_tab(ctx)
            with gr.Tab("Compare", id="compare"):
                compare = build_compare_tab(ctx)
            with gr.Tab("Long context", id="long"):
                build_long_tab(ctx)
            with gr.Tab("Constant-memory lab", id="lab"):
                build_lab_tab(ctx)
            with gr.Tab("System", id="system"):
                system_outputs = build_system_tab(ctx)
        chat.changes += connect_compare(chat, compare, tabs)
        build_history_sidebar(ctx, demo, chat)
        demo.load(_system_loader(ctx), None, system_outputs, api_name="system_on_load")
        demo.unload(_forget_session(ctx))
    mcp_tools_only(demo, MCP_TOOLS)
    demo.temp_file_sets.append(ctx.export_files)  # delete_cache takes the app's exports too
    admit_by_client(demo, ctx)
    demo.fm_context = ctx  # for tests and app.py: the live manager and store
    return demo


def mcp_tools_only(demo: gr.Blocks, names: tuple[str, ...]) -> None:
    """Offer only the API functions `names` as MCP tools; every tab's events stay in the API page.

    Gradio's MCP server lists every documented endpoint as a tool unless its function carries an
    MCP type other than "tool" (the attribute gr.mcp.tool/resource/prompt set, read by
    gradio/mcp.py's list_tools); the tabs' events return whole UI updates and are no tools.
    """
    for block_fn in demo.fns.values():
        if block_fn.fn is not None and block_fn.api_name not in names:
            block_fn.fn._mcp_type = "ui_event"


def admit_by_client(demo: gr.Blocks, ctx: AppContext) -> None:
    """Give every event whose handler counts towards a client's limit (limits.limited) a validator
    that refuses it before it joins the queue when its client is at the limit (limits.py); the
    lab's events (concurrency id LAB) also one run per client."""
    ctx.limits.watch(demo)
    for block_fn in demo.fns.values():
        if block_fn.fn is not None and getattr(block_fn.fn, LIMITED, False):
            block_fn.validator = admission(ctx.limits, block_fn.fn, lab=block_fn.concurrency_id == LAB)


def _system_loader(ctx: AppContext):
    return bind(system_report, ctx)


def _forget_session(ctx: AppContext):
    """When a browser tab closes, drop its conversations and stop flags."""

    def forget(request: gr.Request) -> None:
        try:
            sid = session_id(request)
        except gr.Error:
            return
        ctx.store.reset(sid)
        ctx.stops.forget(sid)

    return forget


def launch_kwargs(settings: Settings) -> dict:
    """Arguments of demo.launch() that style, bound and extend the app (Gradio 6 takes theme/css here).

    app_kwargs reach the FastAPI app launch() builds: its `routes` are the OpenAI-compatible /v1
    endpoints. mcp_server=None (the setting off) leaves Gradio's own GRADIO_MCP_SERVER in charge.
    """
    from .openai_api import api_routes

    max_upload = max(4 * settings.max_upload_chars, settings.max_import_bytes)
    return {
        "theme": theme(),
        "css": CSS + THEME_CSS + EXPLORE_CSS,
        "head": HEAD,
        "max_file_size": max_upload,
        "footer_links": ["api", "settings"],
        "show_error": False,
        "app_kwargs": {"routes": api_routes()},
        "mcp_server": True if settings.mcp_server else None,
    }


def server_kwargs(settings: Settings) -> dict:
    """Arguments of demo.launch() that say where it listens.

    Only an address set explicitly (FM_DEMO_HOST / FM_DEMO_PORT, or --host / --port, which win)
    is passed. Otherwise None leaves the choice to Gradio, so that its own variables apply exactly
    as Gradio reads them: GRADIO_SERVER_NAME (else 127.0.0.1) and GRADIO_SERVER_PORT (else the
    first free port from 7860). A Space starts `python app.py` with those set to 0.0.0.0 and its
    port; passing defaults of ours instead would bind 127.0.0.1 where the Space cannot reach it.
    root_path is never passed, so GRADIO_ROOT_PATH is Gradio's alone as well.
    """
    return {"server_name": settings.host or None, "server_port": settings.port or None}


def queue_kwargs(settings: Settings) -> dict:
    """Arguments of demo.queue(): the queue bound and default concurrency from Settings."""
    from ..zerogpu import queue_options

    return queue_options(settings.queue_max_size, settings.concurrency_limit)
