"""Many users at once, end to end: the real app on 127.0.0.1 driven by concurrent gradio_client users.

Each Client is one Gradio session, so USERS clients sending at once are USERS conversations whose
replies the model's scheduler decodes together. Every greedy reply must equal the reply to the
same message sent alone by a fresh client, and the replies' own metrics (/stats) must show that
they shared decode steps. The model is random weights of the tiny shape whose special tokens
never win, so every reply runs exactly its max_new_tokens (the trained model stops after a few).

Overload: with max_batch=2 and max_waiting=1, a burst from the browser's chat event (which Gradio
does not limit, so the scheduler decides) is refused at once with the scheduler's "busy" message
while the replies holding the rows and the waiting place finish, each equal to its solo reply.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from gradio_client import Client
from test_e2e_api import free_port
from tiny_fixtures import random_checkpoint

from fm_demo.conversations.store import SessionStore
from fm_demo.models import ModelManager
from fm_demo.settings import Settings
from fm_demo.ui import build_demo, launch_kwargs, queue_kwargs
from fm_demo.ui.common import AppContext

USERS = 16
NEW = 24  # tokens per reply under load
HOLD = 300  # tokens per reply holding the small scheduler's places
BURST = 6
TIMEOUT = 60.0  # seconds any one reply may take on a busy machine


def rambling_checkpoint(tmp_path_factory) -> str:
    """tiny_fixtures' random tiny instruct model with its special tokens' lm_head rows zeroed: a logit
    of 0 never beats the best of 2,000 random ones, so no stop token ends a greedy reply early."""
    from transformers import AutoTokenizer, FalconMambaForCausalLM

    src = random_checkpoint("instruct", tmp_path_factory)
    model, tok = FalconMambaForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src)
    with torch.no_grad():
        model.lm_head.weight[tok.all_special_ids] = 0.0
    out = tmp_path_factory.mktemp("rambling-tiny-instruct")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return rambling_checkpoint(tmp_path_factory)


def launch(settings: Settings, checkpoint: str):
    """(url, app context, demo) of the app whose tiny-instruct preset is `checkpoint`."""
    presets = dict(settings.presets())
    presets["tiny-instruct"] = dataclasses.replace(presets["tiny-instruct"], source=checkpoint)
    manager = ModelManager(settings, presets=presets)
    ctx = AppContext(settings, manager, SessionStore(settings, manager))
    manager.get("tiny-instruct")  # loaded before the first user, so its scheduler can be watched
    demo = build_demo(settings, ctx).queue(**queue_kwargs(settings))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, **launch_kwargs(settings))
    return url, ctx, demo


def clients(url: str, n: int) -> list[Client]:
    """n fresh sessions, connected in parallel (each Client reads the API description first)."""
    with ThreadPoolExecutor(min(n, 4)) as pool:  # connecting reads the whole API page: a few at a time
        return list(pool.map(lambda _: Client(url, verbose=False, httpx_kwargs={"timeout": TIMEOUT}), range(n)))


def message(i: int) -> str:
    return f"User {i} asks: tell me about falcon number {i * 7 + 3} and its river."


def solo_replies(url: str, texts: list[str], max_new: int) -> list[str]:
    """Each text sent alone (one after another), each by a fresh client."""
    return [c.predict(t, max_new_tokens=max_new, api_name="/chat") for c, t in zip(clients(url, len(texts)), texts)]


def scheduler_stats(ctx) -> dict:
    (lm,) = ctx.manager.loaded()
    return lm.runner.stats()


@pytest.fixture(scope="module")
def app(checkpoint):
    settings = Settings(device="cpu", max_new_tokens=NEW, max_input_chars=1000)
    url, ctx, demo = launch(settings, checkpoint)
    yield url, ctx
    demo.close()


@pytest.fixture(scope="module")
def small_app(checkpoint):
    settings = Settings(device="cpu", max_new_tokens=NEW, max_batch=2, max_waiting=1)
    url, ctx, demo = launch(settings, checkpoint)
    yield url, ctx
    demo.close()


def test_many_users_at_once_get_their_solo_replies_from_shared_decode_steps(app):
    url, ctx = app
    texts = [message(i) for i in range(USERS)]
    solo = solo_replies(url, texts, NEW)
    users = clients(url, USERS)
    steps_before = scheduler_stats(ctx)["steps"]
    t0 = time.perf_counter()
    jobs = [c.submit(t, max_new_tokens=NEW, api_name="/chat") for c, t in zip(users, texts)]
    replies = [job.result(timeout=TIMEOUT) for job in jobs]  # raises on any error
    elapsed = time.perf_counter() - t0
    assert replies == solo, [i for i, (a, b) in enumerate(zip(replies, solo)) if a != b]

    metrics = [c.predict(api_name="/stats")["last_reply"] for c in users]
    assert all(m["finish_reason"] == "length" and m["new_tokens"] == NEW for m in metrics)
    means = [m["batch_mean"] for m in metrics]
    assert max(means) > 1, means  # replies really shared decode steps
    stats = scheduler_stats(ctx)
    assert stats["errors"] == 0 and stats["busy_refusals"] == 0 and stats["active_rows"] == 0
    assert stats["steps"] - steps_before < USERS * NEW  # fewer steps than tokens: batched
    assert elapsed < TIMEOUT


def test_a_burst_beyond_capacity_is_told_busy_at_once_while_running_replies_finish(small_app):
    url, ctx = small_app
    texts = [message(100 + i) for i in range(3)]  # 2 rows + 1 waiting place
    sessions = clients(url, len(texts) + BURST)
    holders, burst = sessions[:len(texts)], sessions[len(texts):]
    jobs = [c.submit(t, max_new_tokens=HOLD, api_name="/chat") for c, t in zip(holders, texts)]
    deadline = time.monotonic() + TIMEOUT
    while (st := scheduler_stats(ctx))["active_rows"] + st["waiting"] < len(texts):  # every place taken
        assert time.monotonic() < deadline and not any(j.done() for j in jobs), st
        time.sleep(0.02)

    # the browser's chat event: Gradio runs as many as arrive, so the scheduler answers each one
    t0 = time.perf_counter()
    refused = [c.submit(message(200 + i), "tiny-instruct", "fp32", "", 0.0, 1.0, 0, 1.0, 8, 0,
                        api_name="/chat_send") for i, c in enumerate(burst)]
    for job in refused:
        with pytest.raises(Exception, match="The server is busy"):
            job.result(timeout=TIMEOUT)
    refused_after = time.perf_counter() - t0
    assert not all(j.done() for j in jobs), refused_after  # told busy while the holders still run
    assert scheduler_stats(ctx)["busy_refusals"] >= BURST

    replies = [job.result(timeout=TIMEOUT) for job in jobs]
    assert replies == solo_replies(url, texts, HOLD)
    assert scheduler_stats(ctx)["errors"] == 0
