"""Fair share of the server, end to end on the real app (127.0.0.1, free port): the lab runs one
measurement at a time and one per client, a client may have only so many events at once across
the tabs, the Gradio API and /v1, and the lab's deliberate out-of-memory pass runs only on a
device nobody else is using.

Clients are told apart as the server tells them apart: a gradio_client Client is one session,
and its address is the X-Forwarded-For it sends (uvicorn takes it from a peer on 127.0.0.1).
"""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import ValidationError
from test_e2e_api import free_port
from test_ui_handlers import LivePeak, tiny_context

from fm_demo import lab
from fm_demo.engine import Engine
from fm_demo.serving import Request
from fm_demo.settings import Settings, SettingsError
from fm_demo.ui import build_demo, launch_kwargs, queue_kwargs
from fm_demo.ui.lab_tab import COMPUTED, device_is_free, prefill_frame, sweep_note

LONG = 16_384  # lab tokens: far longer than any test waits; every run here is cancelled or refused


def serve(settings: Settings, tmp_path_factory):
    ctx = tiny_context(settings, tmp_path_factory)
    demo = build_demo(settings, ctx).queue(**queue_kwargs(settings))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, **launch_kwargs(settings))
    return demo, url.rstrip("/"), ctx


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    settings = Settings(device="cpu", max_new_tokens=8, max_events_per_client=1, lab_max_waiting=1,
                        max_new_tokens_cap=100_000, limit_by_address=True)
    demo, url, ctx = serve(settings, tmp_path_factory)
    yield url, ctx, demo
    demo.close()


def visitor(url: str, address: str) -> Client:
    return Client(url, verbose=False, headers={"X-Forwarded-For": address})


def lab_run(client: Client):
    return client.submit("tiny-instruct", "fp32", LONG, 600, api_name="/lab_decode")


def lab_events(demo) -> int:
    return sum(e.fn.concurrency_id == "lab" for e in list(demo._queue.event_ids_to_events.values()))


def until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def refused(fn) -> str:
    with pytest.raises(ValidationError) as info:
        fn()
    return str(info.value)


def test_the_lab_runs_one_at_a_time_one_per_client_and_a_bounded_queue(app):
    url, ctx, demo = app
    a, b, c = (visitor(url, f"10.0.0.{i}") for i in (1, 2, 3))
    first = lab_run(a)
    until(lambda: lab_events(demo) == 1)
    # the same client again: refused before it is queued, while its run runs
    assert "already have a lab run" in refused(lambda: a.predict("tiny-instruct", "fp32", 256,
                                                                 api_name="/lab_prefill"))
    second = lab_run(b)  # another client: queued behind the first (one measurement at a time)
    until(lambda: lab_events(demo) == 2)
    time.sleep(0.5)
    assert second.status().code.name in ("IN_QUEUE", "STARTING", "JOINING_QUEUE")
    assert "already have a lab run" in refused(lambda: lab_run(b).result(timeout=30))  # queued counts too
    # one running, lab_max_waiting (1) waiting: a third client is told the lab is busy
    assert "lab is busy" in refused(lambda: lab_run(c).result(timeout=30))
    first.cancel()
    until(lambda: second.status().code.name == "PROCESSING" or lab_events(demo) <= 1)
    second.cancel()
    until(lambda: lab_events(demo) == 0)
    done = c.predict("tiny-instruct", "fp32", 64, 10, api_name="/lab_decode")  # room again
    assert "Done" in done[-1]


def test_a_client_at_its_limit_is_refused_across_tabs_the_gradio_api_and_v1(app):
    url, ctx, demo = app
    busy = visitor(url, "10.0.1.1")
    run = lab_run(busy)  # one event: this visitor's limit (max_events_per_client=1)
    until(lambda: lab_events(demo) == 1)
    try:
        same_session = refused(lambda: busy.predict("Hello", api_name="/chat"))
        assert "requests running or waiting" in same_session
        same_address = visitor(url, "10.0.1.1")  # a new session from the same address
        assert "requests running or waiting" in refused(lambda: same_address.predict("Hi", api_name="/chat"))
        raw = httpx.post(f"{url}/v1/chat/completions", headers={"X-Forwarded-For": "10.0.1.1"}, json={
            "model": "tiny-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert raw.status_code == 429 and raw.headers["retry-after"] == "1"
        err = raw.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and "requests running or waiting" in err["message"]
        other = visitor(url, "10.0.1.2")  # anyone else is served as usual
        assert isinstance(other.predict("Hello", api_name="/chat"), str)
    finally:
        run.cancel()
    until(lambda: lab_events(demo) == 0)
    assert isinstance(busy.predict("Hello", api_name="/chat"), str)  # its event ended: served again


def test_a_v1_stream_counts_until_it_ends(app):
    url, ctx, demo = app
    lm = ctx.manager.get("tiny-instruct")
    headers = {"X-Forwarded-For": "10.0.2.1"}
    body = {"model": "tiny-instruct", "prompt": "Once upon a time", "max_tokens": 100_000, "stream": True,
            "ignore_eos": True}
    same_address = visitor(url, "10.0.2.1")
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)
        assert "requests running or waiting" in refused(lambda: same_address.predict("Hello", api_name="/chat"))
        again = httpx.post(f"{url}/v1/completions", headers=headers, json={**body, "stream": False, "max_tokens": 2})
        assert again.status_code == 429
    until(lambda: lm.runner.in_use() == 0)
    ok = httpx.post(f"{url}/v1/completions", headers=headers, json={**body, "stream": False, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_lab_sizes_are_bounded_by_the_settings(tmp_path_factory):
    import gradio as gr

    from fm_demo.ui.lab_tab import run_decode, run_prefill, sizes_for

    small = sizes_for("cuda", max_tokens=4096, max_seconds=120)
    assert (small.max_tokens, small.max_prompt, small.tokens, small.prompt, small.limit_s) == (4096, 4096, 4096,
                                                                                              4096, 120)
    ctx = tiny_context(Settings(device="cpu", lab_max_tokens=1024, lab_max_seconds=60), tmp_path_factory)
    request = gr.Request(session_hash="lab-bounds")
    with pytest.raises(gr.Error, match="up to 1,024 tokens"):
        next(run_prefill(ctx, "tiny-instruct", "fp32", 2048, request))
    with pytest.raises(gr.Error, match="up to 1,024 tokens and 60 s per model"):
        next(run_decode(ctx, "tiny-instruct", "fp32", 64, 120, request))
    with pytest.raises(gr.Error, match="up to 1,024 tokens and 60 s per model"):
        next(run_decode(ctx, "tiny-instruct", "fp32", 2048, 30, request))
    assert ctx.manager.loaded() == []  # refused before anything loads
    with pytest.raises(SettingsError, match="lab_max_tokens"):
        Settings(device="cpu", lab_max_tokens=100)


# -- the deliberate out-of-memory pass ---------------------------------------------------------
def test_a_gpu_serving_requests_is_not_free_and_the_cpu_always_is(app):
    _, ctx, _ = app
    lm = ctx.manager.get("tiny-base")
    assert device_is_free(ctx, torch.device("cuda")) and device_is_free(ctx, torch.device("cpu"))
    held = lm.runner.submit(Request([1, 2, 3], max_new_tokens=10 ** 6))
    next(held.tokens())
    try:
        assert not device_is_free(ctx, torch.device("cuda"))  # a row runs: no out-of-memory pass there
        assert device_is_free(ctx, torch.device("cpu"))
    finally:
        held.close()
    assert device_is_free(ctx, torch.device("cuda"))


def test_without_a_free_device_the_parallel_figure_is_computed_and_the_result_says_so(app, monkeypatch):
    _, ctx, _ = app
    monkeypatch.setattr(lab, "PeakMemory", LivePeak)
    engine = Engine(ctx.manager.get("tiny-instruct").engine.model, chunk_size=8)
    measured = list(lab.prefill_peaks(engine, [32, 64], chunk_size=8))
    answers = iter([True, False])  # free for the first length, busy by the second
    mixed = list(lab.prefill_peaks(engine, [32, 64], chunk_size=8, parallel_ok=lambda: next(answers)))
    assert [p.parallel_computed for p in measured] == [False, False]
    assert [p.parallel_computed for p in mixed] == [False, True]
    short, long = mixed
    assert long.parallel_bytes == lab.parallel_estimate(long.chunked_bytes, 64, 8) == long.chunked_bytes * 8
    # the computed figure is of the measured one's size (activations for every position at once)
    assert 0.5 * measured[1].parallel_bytes < long.parallel_bytes < 2 * measured[1].parallel_bytes
    frame = prefill_frame(mixed)
    assert set(frame[frame["prompt tokens"] == 64]["series"]) == {COMPUTED, "chunked prefill"}
    note = sweep_note(mixed, torch.device("cuda"), 8)
    assert "not run for 1 of 2 lengths (64 tokens)" in note and "serving other requests" in note
    assert "not run" not in sweep_note(measured, torch.device("cuda"), 8)


@pytest.fixture(scope="module")
def sessions_only(tmp_path_factory):
    """Addresses not counted (the default: behind an untrusted proxy every visitor shares one)."""
    settings = Settings(device="cpu", max_new_tokens=8, max_events_per_client=1)
    demo, url, ctx = serve(settings, tmp_path_factory)
    yield url, ctx, demo
    demo.close()


def test_by_default_a_session_is_limited_and_an_address_is_not(sessions_only):
    url, ctx, demo = sessions_only
    busy = visitor(url, "10.0.4.1")
    run = lab_run(busy)
    until(lambda: lab_events(demo) == 1)
    try:
        assert "requests running or waiting" in refused(lambda: busy.predict("Hello", api_name="/chat"))
        neighbour = visitor(url, "10.0.4.1")  # another session at the same address
        assert isinstance(neighbour.predict("Hello", api_name="/chat"), str)
        raw = httpx.post(f"{url}/v1/chat/completions", headers={"X-Forwarded-For": "10.0.4.1"}, json={
            "model": "tiny-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert raw.status_code == 200
    finally:
        run.cancel()
    until(lambda: lab_events(demo) == 0)


def counted(demo, session: str) -> int:
    """This session's events that count towards its limit, in Gradio's queue now."""
    return sum(e.session_hash == session and getattr(e.fn.fn, "_fm_limited", False)
               for e in list(demo._queue.event_ids_to_events.values()))


def test_a_burst_of_joins_from_one_session_lets_in_exactly_its_limit(app):
    url, ctx, demo = app
    holder = visitor(url, "10.0.5.1")
    running = lab_run(holder)
    until(lambda: lab_events(demo) == 1)
    burst = visitor(url, "10.0.5.2")
    # six lab runs asked for at once (gradio_client joins each from a thread of its own): the one
    # let in waits behind the running one, so it is still counted while the others ask
    jobs = [lab_run(burst) for _ in range(6)]
    let_in = ("IN_QUEUE", "PROCESSING", "ITERATING", "PROGRESS")
    try:
        until(lambda: all(j.done() or j.status().code.name in let_in for j in jobs))
        time.sleep(0.5)
        refusals = [j for j in jobs if j.done()]
        assert len(refusals) == 5 and counted(demo, burst.session_hash) == 1
        for j in refusals:
            assert isinstance(j.exception(), ValidationError) and "already have a lab run" in str(j.exception())
    finally:
        for j in (*jobs, running):
            j.cancel()
    until(lambda: lab_events(demo) == 0)


def test_an_event_or_request_that_fails_stops_counting_and_one_that_succeeds_too(app):
    url, ctx, demo = app
    one = visitor(url, "10.0.6.1")  # max_events_per_client=1: a count left behind refuses the next
    for _ in range(3):
        with pytest.raises(Exception) as info:
            one.predict("Hello", preset="no-such-model", api_name="/chat")
        assert not isinstance(info.value, ValidationError)  # the handler's own error, not a refusal
    for _ in range(2):
        assert isinstance(one.predict("Hello", api_name="/chat"), str)
    headers = {"X-Forwarded-For": "10.0.6.2"}
    chat = {"model": "tiny-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for body, status in (({**chat, "model": "no-such-model"}, 404), ({**chat, "max_tokens": -1}, 400),
                         ({**chat, "model": "no-such-model"}, 404), (chat, 200), (chat, 200),
                         ({**chat, "stream": True}, 200), (chat, 200)):
        answer = httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body, timeout=60)
        assert answer.status_code == status, answer.text
    bad_json = httpx.post(f"{url}/v1/chat/completions", headers=headers, content=b"{", timeout=60)
    assert bad_json.status_code == 400
    assert ctx.limits._api == {}  # every ticket closed
    assert httpx.post(f"{url}/v1/chat/completions", headers=headers, json=chat, timeout=60).status_code == 200
