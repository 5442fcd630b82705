"""End to end: the real app on 127.0.0.1 (free port), driven through gradio_client.

The client is one Gradio session, so /chat twice is a two-turn conversation: the second turn must
report tokens reused from the cached recurrent state (/stats).
"""

from __future__ import annotations

import socket

import pytest
from gradio_client import Client
from test_ui_handlers import tiny_context

from fm_demo.settings import Settings
from fm_demo.ui import build_demo, launch_kwargs, queue_kwargs

N = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    settings = Settings(device="cpu", max_new_tokens=N, max_input_chars=1000)
    demo = build_demo(settings, tiny_context(settings, tmp_path_factory)).queue(**queue_kwargs(settings))
    _, local_url, _ = demo.launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        quiet=True,
        **launch_kwargs(settings),
    )
    yield local_url
    demo.close()


def test_api_lists_the_documented_endpoints(url):
    endpoints = Client(url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/chat", "/compare", "/reset", "/stats"} <= set(endpoints)
    chat_params = {p["parameter_name"]: p for p in endpoints["/chat"]["parameters"]}
    assert not chat_params["message"]["parameter_has_default"]
    assert all(chat_params[k]["parameter_has_default"] for k in ("temperature", "top_p", "top_k", "seed"))
    for name in ("/chat", "/compare"):  # the server's default reply length, documented as it is
        tokens = {p["parameter_name"]: p for p in endpoints[name]["parameters"]}["max_new_tokens"]
        assert tokens["parameter_default"] == N and tokens["python_type"]["type"] == "int"


def test_chat_streams_and_the_second_turn_reuses_the_state(url):
    client = Client(url, verbose=False)
    job = client.submit("Hello there", max_new_tokens=N, api_name="/chat")
    first = job.result()
    streamed = job.outputs()
    assert isinstance(first, str) and first and streamed[-1] == first
    assert len(streamed) >= 2  # partial replies arrived before the whole one

    stats = client.predict(api_name="/stats")
    assert stats["turns"] == 1 and stats["last_reply"]["reused_tokens"] == 0
    context = stats["context_tokens"]

    sampled = {"temperature": 0.8, "seed": 3, "max_new_tokens": N}
    second = client.predict("Tell me more", **sampled, api_name="/chat")
    stats = client.predict(api_name="/stats")
    reply = stats["last_reply"]
    assert stats["turns"] == 2 and reply["reused_tokens"] == context > 0 and reply["cache_hit"]
    assert reply["new_tokens"] <= N and reply["kv_cache_equiv_bytes"] == stats["context_tokens"] * 128 * 1024
    # greedy and seeded replies reproduce: another session with the same turns gets the same text
    again = Client(url, verbose=False)
    assert again.predict("Hello there", max_new_tokens=N, api_name="/chat") == first
    assert again.predict("Tell me more", **sampled, api_name="/chat") == second

    assert client.predict(api_name="/reset") == "reset all conversations"
    assert client.predict(api_name="/stats")["turns"] == 0


def test_sessions_are_separate(url):
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    a.predict("Only in A", max_new_tokens=4, api_name="/chat")
    assert a.predict(api_name="/stats")["turns"] == 1
    assert b.predict(api_name="/stats")["turns"] == 0


def test_compare_streams_both_panes(url):
    client = Client(url, verbose=False)
    result = client.predict("Compare this", max_new_tokens=N, api_name="/compare")
    assert set(result) == {"left", "right"} and result["left"] and result["right"]
    client.predict("And this", max_new_tokens=N, api_name="/compare")
    for slot in ("left", "right"):
        stats = client.predict(slot=slot, api_name="/stats")
        assert stats["turns"] == 2 and stats["last_reply"]["reused_tokens"] > 0


def test_oversized_message_is_refused_with_its_reason(url):
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="limit is 1,000"):
        client.predict("z" * 1001, api_name="/chat")
    assert client.predict("", api_name="/chat") == ""  # an empty message does nothing


def test_uploads_and_exports_are_deleted_after_their_age(tmp_path_factory):
    """Gradio's delete_cache, from FM_DEMO_TEMP_FILE_AGE_S: an uploaded file and an exported
    conversation are gone from the server's disk a little after their age."""
    import time
    from pathlib import Path

    import httpx

    import gradio as gr

    from fm_demo.ui import chat_tab
    from fm_demo.ui.inputs import Sampling

    settings = Settings(device="cpu", max_new_tokens=N, temp_file_age_s=3)
    ctx = tiny_context(settings, tmp_path_factory)
    demo = build_demo(settings, ctx).queue(**queue_kwargs(settings))
    _, local_url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                  quiet=True, **launch_kwargs(settings))
    try:
        session = gr.Request(session_hash="exporter")
        knobs = chat_tab.Knobs("tiny-instruct", "fp32", "", Sampling(temperature=0.0, max_new_tokens=N))
        for _ in chat_tab.send(ctx, "Keep this", knobs, [], request=session):
            pass
        chat_tab.export(ctx, "tiny-instruct", "fp32", request=session)
        (written,) = ctx.exports.iterdir()
        r = httpx.post(f"{local_url.rstrip('/')}/gradio_api/upload", files={"files": ("note.txt", b"hello")})
        upload = Path(r.json()[0])
        assert upload.read_bytes() == b"hello" and written.exists()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (upload.exists() or written.exists()):
            time.sleep(0.5)
        assert not upload.exists() and not written.exists()
    finally:
        demo.close()
