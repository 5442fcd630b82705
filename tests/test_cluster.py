"""The app on a Ray cluster: a real local cluster (2 CPUs), real model replicas, the real ingress.

Unit tests first (no cluster): settings, the routing table, session keys, and the replica's reply
from each of its three starting points on the real tiny model. Then one local cluster for the
module (Ray with 2 CPUs, a 200 MB object store, no dashboard, Serve's proxy on 127.0.0.1): the
app with 1 to 2 model replicas of the tiny models, autoscaled, driven through gradio_client (the
browser's path) and through an ingress in this process (the same code without Gradio).

Greedy replies are compared with the single-machine path (`python app.py`'s ModelManager and
Conversation, no Ray): a conversation whose replica was lost must reply exactly the same.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the cluster tests need Ray Serve (requirements-cluster.txt)")

from fm_demo.cluster.config import ClusterSettings, IngressSettings, settings_env
from fm_demo.cluster.placement import ReplicaIndex
from fm_demo.cluster.protocol import (
    COPIED,
    NEW,
    OWN_CACHE,
    REBUILT,
    ReplyEnd,
    ReplyRequest,
    ReplyStart,
    Token,
)
from fm_demo.conversations.sessions import Conversation
from fm_demo.engine import SamplingParams
from fm_demo.models import ModelManager
from fm_demo.settings import Settings, SettingsError

ROOT = str(Path(__file__).resolve().parents[1])
GREEDY = SamplingParams()
APP = "fm-test"
TURN1, TURN2 = "What is the capital of France?", "Spell the word cat."


# -- no cluster ----------------------------------------------------------------------------------
def test_cluster_settings_are_parsed_like_the_app_settings():
    env = settings_env({"cluster_max_replicas": 4, "compare_presets": ["tiny-base", "tiny-instruct"]}, env={})
    assert env == {"FM_DEMO_CLUSTER_MAX_REPLICAS": "4", "FM_DEMO_COMPARE_PRESETS": "tiny-base,tiny-instruct"}
    cluster = ClusterSettings.from_env({"FM_DEMO_CLUSTER_MIN_REPLICAS": "2",
                                        "FM_DEMO_CLUSTER_COPY_STATE_BYTES": "1MiB"})
    assert cluster.cluster_min_replicas == 2 and cluster.cluster_copy_state_bytes == 1 << 20
    with pytest.raises(SettingsError, match="FM_DEMO_CLUSTER_MAX_REPLICAS"):
        ClusterSettings.from_env({"FM_DEMO_CLUSTER_MIN_REPLICAS": "3", "FM_DEMO_CLUSTER_MAX_REPLICAS": "2"})
    with pytest.raises(SettingsError, match="not a setting"):
        settings_env({"replicas": 2}, env={})


def test_the_ingress_chooses_precisions_and_batches_for_the_replicas_device():
    resolved = {"device": "cuda", "default_preset": "7b-instruct",
                "compare_presets": ("7b-base", "7b-instruct")}
    gpu = IngressSettings.for_replicas({}, resolved, replicas=4)
    assert gpu.device == "cpu" and gpu.precision_for("7b-instruct") == "bf16"
    assert gpu.precision_for("tiny-base") == "fp32"
    assert gpu.batch_size_limit() == 64 and gpu.event_concurrency() == 4 * 128
    cpu = IngressSettings.for_replicas({}, {**resolved, "device": "cpu"}, replicas=1)
    assert cpu.precision_for("7b-instruct") == "fp32"
    assert cpu.event_concurrency() == Settings(device="cpu").event_concurrency()


def test_the_routing_table_finds_the_replica_with_the_longest_prefix():
    index = ReplicaIndex()
    index.record("s1", [1, 2, 3, 4], "a")
    index.record("s1", [1, 2, 3, 4, 5, 6, 7], "b")
    assert index.find("s1", [1, 2, 3, 4, 5, 6, 7, 8]) == (7, "b")
    assert index.find("s1", [1, 2, 3, 4, 9]) == (4, "a")
    assert index.find("s1", [9]) == (0, None) and index.find("s2", [1, 2, 3, 4]) == (0, None)  # namespaces
    index.record("s1", [1, 2, 3, 4], "c")  # the latest holder wins
    assert index.find("s1", [1, 2, 3, 4, 9]) == (4, "c")
    shared = ReplicaIndex(shared=True)
    shared.record("s1", [1, 2, 3], "a")
    assert shared.find("s2", [1, 2, 3, 4]) == (3, "a")


def test_a_browser_session_maps_to_one_ingress_replica():
    from fm_demo.cluster.router import rendezvous, session_key

    scope = {"headers": [(b"cookie", b"a=1; fm_session=abc")], "query_string": b"session_hash=zzz"}
    assert session_key(scope) == "abc" and session_key({"query_string": b"session_hash=zzz"}) == "zzz"
    assert session_key(scope, header_session="hdr") == "hdr" and session_key({"headers": []}) is None
    replicas = ["r1", "r2", "r3"]
    owners = {k: rendezvous(k, replicas) for k in (f"s{i}" for i in range(60))}
    assert set(owners.values()) == set(replicas)
    after = {k: rendezvous(k, ["r1", "r3"]) for k in owners}  # r2 lost: only its sessions move
    assert all(after[k] == v for k, v in owners.items() if v != "r2")


@pytest.fixture(scope="module")
def local():
    """The single-machine path: the tiny instruct model in this process, no Ray."""
    settings = Settings(device="cpu", max_new_tokens=32)
    return settings, ModelManager(settings).get("tiny-instruct")


def _reply_items(lm, req: ReplyRequest) -> list:
    from fm_demo.cluster.replica import run_reply

    items: list = []
    run_reply(lm, req, "local", items.append, threading.Event(), lambda state: state)  # no object store
    return items


def test_a_replica_resumes_from_its_cache_the_state_sent_or_the_tokens_alike(local):
    from fm_demo import chat

    settings, lm = local
    conv = Conversation(lm, settings, namespace="unit")
    _turn(conv, TURN1)
    history = conv.token_ids()
    kept = conv.cache.at(len(history)).clone()
    delta = chat.next_prompt(conv.fmt, lm.tokenizer, conv.turns, TURN2, system=conv.system).prompt
    stops = tuple(chat.stop_token_ids(conv.fmt, lm.tokenizer, lm.model.generation_config.eos_token_id))
    _turn(conv, TURN2)  # the single-machine reply, for reference

    def run(namespace: str, prefix: list[int], state) -> tuple[ReplyStart, list[int]]:
        req = ReplyRequest(lm.key, namespace, prefix, delta if prefix else history + delta, GREEDY, 32, stops,
                           state, None, 1 << 30)
        items = _reply_items(lm, req)
        end = items[-1]
        assert isinstance(end, ReplyEnd) and end.state.seqlen == len(history) + len(delta) + end.fed
        return items[0], [t.token_id for t in items if isinstance(t, Token)]

    start, own = run("unit", history, None)  # this namespace's states are in the model's prefix cache
    assert start.source == OWN_CACHE and start.start >= len(history)
    start, copied = run("elsewhere", history, kept)
    assert (start.source, start.start, start.moved_bytes) == (COPIED, len(history), kept.nbytes)
    start, rebuilt = run("nowhere", history, None)
    assert (start.source, start.start) == (REBUILT, 0)
    start, fresh = run("nothing-sent", [], None)
    assert (start.source, start.start) == (NEW, 0)
    assert own == copied == rebuilt == fresh == conv.turns[-1].reply_ids


# -- a local Ray cluster -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout_s: float, what: str, step_s: float = 0.5):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if (value := condition()):
            return value
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-CPU Ray cluster with the app: 1 model replica, autoscaled to 2 under load."""
    from tiny_fixtures import random_checkpoint

    env = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": ROOT,  # Ray's workers import fm_demo from here
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",  # load reaches the autoscaler fast
           "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from ray import serve

    from fm_demo.cluster.app import build_app

    rambler = random_checkpoint("instruct", tmp_path_factory)  # replies as long as asked: load for the tests
    args = {"cluster_min_replicas": 1, "cluster_max_replicas": 2, "cluster_target_requests": 2,
            "cluster_upscale_delay_s": 1, "max_new_tokens": 32, "extra_models": f"{rambler}:instruct"}
    ray.init(num_cpus=2, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}/", "args": args, "rambler": Path(rambler).name}
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def ingress(cluster):
    """The ingress's own code (RemoteModelManager, conversations) in this process, without Gradio."""
    from ray import serve

    from fm_demo.cluster.remote import RemoteModelManager

    handle = serve.get_deployment_handle("FalconMamba", APP)
    env = settings_env(cluster["args"])
    settings = IngressSettings.for_replicas(env, handle.resolved.remote().result(), 2)
    return settings, RemoteModelManager(settings, handle, 64 << 20)


def _running() -> int:
    """Model replicas running now."""
    from ray import serve

    return serve.status().applications[APP].deployments["FalconMamba"].replica_states.get("RUNNING", 0)


def _kill(replica: str) -> None:
    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#FalconMamba#{replica}", namespace="serve")
    ray.kill(actor, no_restart=True)


def _turn(conv: Conversation, text: str, max_new: int = 32) -> tuple[str, object]:
    events = list(conv.send(text, GREEDY, max_new))
    return events[-1].text, conv.last_metrics


def _ramble(lm, settings, namespace: str, max_new: int) -> str:
    conv = Conversation(lm, settings, namespace=namespace)
    _turn(conv, f"Tell me a long story, {namespace}.", max_new)
    return conv.last_metrics.served_by


def test_a_replica_added_under_load_takes_new_conversations(cluster, ingress):
    settings, manager = ingress
    lm = manager.get(cluster["rambler"])
    first = _ramble(lm, settings, "warm-up", 8)
    assert _running() == 1
    stop = threading.Event()

    def load(i: int) -> None:
        n = 0
        while not stop.is_set() and n < 40:  # bounded: 40 replies per thread at most
            _ramble(lm, settings, f"load-{i}-{n}", 200)
            n += 1

    with ThreadPoolExecutor(6) as pool:
        for i in range(6):
            pool.submit(load, i)
        try:
            _wait(lambda: _running() == 2, 120, "the autoscaler to add a second replica under load")
            # Serve reports the replica running a moment before this process's router hears of it
            # (a long poll): new conversations are sent in rounds of 4 until one reaches it, bounded.
            served: list[str] = []
            end = time.monotonic() + 60
            with ThreadPoolExecutor(4) as new:
                while time.monotonic() < end and all(s == first for s in served):
                    k = len(served)
                    served += new.map(lambda i: _ramble(lm, settings, f"new-{k + i}", 16), range(4))
        finally:
            stop.set()
    assert any(s != first for s in served), f"all went to the old replica {first}: {served}"


def test_the_http_api_is_the_apps_and_conversations_stay_on_their_replica(cluster):
    from gradio_client import Client

    _wait(lambda: _running() == 2, 60, "two model replicas")
    endpoints = Client(cluster["url"], verbose=False).view_api(print_info=False, return_format="dict")
    assert {"/chat", "/compare", "/reset", "/stats"} <= set(endpoints["named_endpoints"])

    def two_turns(i: int) -> tuple[dict, dict]:
        client = Client(cluster["url"], verbose=False)
        client.predict(f"Tell me about the number {i}, please.", max_new_tokens=120,
                       preset=cluster["rambler"], api_name="/chat")
        one = client.predict(api_name="/stats")
        client.predict("And then?", max_new_tokens=8, preset=cluster["rambler"], api_name="/chat")
        return one, client.predict(api_name="/stats")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(two_turns, range(8)))
    firsts = {one["last_reply"]["served_by"] for one, _ in results}
    assert len(firsts) == 2, f"eight conversations at once should use both replicas, used {firsts}"
    for one, two in results:
        reply = two["last_reply"]
        assert reply["served_by"] == one["last_reply"]["served_by"]  # affinity
        assert reply["reused_tokens"] == one["context_tokens"] > 0
        assert reply["state_source"].startswith("its own")


def test_the_openai_compatible_api_is_served_too_and_a_resent_history_is_cached(cluster):
    import httpx

    url = cluster["url"] + "v1"
    assert "tiny-instruct" in {m["id"] for m in httpx.get(f"{url}/models", timeout=30).json()["data"]}
    messages = [{"role": "user", "content": TURN1}]
    body = {"model": "tiny-instruct", "max_tokens": 32, "temperature": 0, "cache_salt": "v1-test"}
    first = httpx.post(f"{url}/chat/completions", json={**body, "messages": messages}, timeout=60).json()
    answer = first["choices"][0]["message"]["content"]
    assert answer and first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": TURN2}]
    second = httpx.post(f"{url}/chat/completions", json={**body, "messages": messages}, timeout=60).json()
    assert second["choices"][0]["message"]["content"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > first["usage"]["prompt_tokens"]


def test_without_a_kept_state_another_replica_rebuilds_it_from_the_transcript(cluster, ingress, local):
    """Copying states off is off (budget 0): a replica that lacks the state reads the tokens again."""
    from fm_demo.cluster.remote import RemoteModelManager

    settings, manager = ingress
    settings_local, lm_local = local
    control = Conversation(lm_local, settings_local, namespace="control-2")
    expected = [_turn(control, TURN1)[0], _turn(control, TURN2)[0]]
    nocopy = RemoteModelManager(settings, manager.handle, 0).get("tiny-instruct")
    conv = Conversation(nocopy, settings, namespace="no-copy")
    assert _turn(conv, TURN1)[0] == expected[0] and conv.cache.at(conv.context_tokens) is None
    holder = conv.last_metrics.served_by.removeprefix("replica ")
    other = _wait(lambda: next((r for r in _replica_ids(nocopy) if r != holder), None), 30,
                  "the other replica")
    nocopy.runner.index.record(conv.namespace, conv.token_ids(), other)  # send the next turn away
    text, m = _turn(conv, TURN2)
    assert text == expected[1] and m.served_by == f"replica {other}"
    assert m.state_source.startswith("read from the start") and not m.cache_hit
    assert m.rebuilt_tokens == len(control.turns[0].prompt_ids) + len(control.turns[0].reply_ids)


def test_killing_a_replica_mid_conversation_loses_nothing(cluster, local):
    from gradio_client import Client

    settings, lm = local
    control = Conversation(lm, settings, namespace="control")
    expected = [_turn(control, TURN1)[0], _turn(control, TURN2)[0]]

    _wait(lambda: _running() == 2, 60, "two model replicas")
    client = Client(cluster["url"], verbose=False)
    assert client.predict(TURN1, max_new_tokens=32, api_name="/chat") == expected[0]
    first = client.predict(api_name="/stats")["last_reply"]
    lost = first["served_by"].removeprefix("replica ")
    _kill(lost)
    t0 = time.perf_counter()
    assert client.predict(TURN2, max_new_tokens=32, api_name="/chat") == expected[1]
    recovered_s = time.perf_counter() - t0
    after = client.predict(api_name="/stats")
    reply = after["last_reply"]
    assert reply["served_by"] != first["served_by"] and reply["state_source"].startswith("state copied")
    assert reply["reused_tokens"] == first["context_tokens"] and after["turns"] == 2
    assert recovered_s < 30


def test_a_reply_continues_on_another_replica_when_its_replica_is_lost_mid_reply(cluster, ingress):
    _, manager = ingress
    lm = manager.get(cluster["rambler"])
    _wait(lambda: _running() == 2, 120, "Serve to replace the replica lost before")
    prompt = [3, 4, 5, 6, 7, 8, 9, 10]

    def reply(namespace: str, kill_after: int | None) -> tuple[list[int], object]:
        from fm_demo.serving import Request

        stream = lm.runner.submit(Request(prompt, namespace, GREEDY, 400, tokenizer=lm.tokenizer))
        tokens = []
        for ev in stream.tokens():
            tokens.append(ev.token_id)
            if len(tokens) == kill_after:
                _kill(stream.served_by.removeprefix("replica "))
        return tokens, stream

    expected, _ = reply("mid-control", None)
    got, stream = reply("mid-lost", 5)
    assert "lost" in stream.state_source, "the replica was not lost before the reply ended: nothing was tested"
    assert got == expected and len(got) == 400


def _replica_ids(lm) -> set[str]:
    """Replica ids that answer now (a few quick calls; each goes to the least loaded one)."""
    seen = set()
    for _ in range(8):
        seen.add(lm.runner.handle.stats.remote().result()["replica"])
    return seen
