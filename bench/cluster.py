"""The app on a local Ray cluster: throughput with 1 vs 2 model replicas, and a lost replica.

    python bench/cluster.py --json          # ~3 minutes on 2 CPU cores
    python bench/cluster.py --quick --json  # 4 users, 1 turn of 16 tokens: a smoke run (the same keys)

Without Ray (`pip install -r requirements-cluster.txt`) it prints {"skipped": "<why>"} and exits 0.

Starts a local Ray cluster (--cpus CPUs, a small object store, no dashboard), deploys the app
(fm_demo/cluster) with a tiny-shaped Falcon Mamba of random weights, which writes as many tokens
as asked (the bundled models answer in a few), one CPU core and one torch thread per replica, and
drives it from an ingress in this process (the ingress's own code: RemoteModelManager,
Conversations; no Gradio, whose per-event cost on a 2-core machine would be measured instead):

- agg_tok_s: generated tokens per second over all replies, --users conversations at once, each
  --turns greedy turns of --new-tokens tokens, with 1 and then 2 model replicas;
- recover_s: a conversation of --turns turns loses its replica (killed); seconds from the kill to
  the first token of its next turn, served by the other replica from the state the ingress kept;
- moved_bytes: bytes of state that replica fetched to resume (the recurrent state; the token ids
  travel with every request anyway);
- kv_bytes_same_length: what a transformer's KV cache would hold at the same context length
  (fm_demo/metrics.py's reference: Llama-3-8B / Mistral-7B in bf16, 128 KiB per token);
- batching_bound: t(--users rows) / t(half as many) of one decode step, measured here: with the
  users split evenly, a second replica can add at most this factor (a step's cost is partly per
  step, not per row, and one replica already batches every user).
Other processes on the machine share its cores: run it on an idle machine for stable numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

APP = "fm-bench"
GREEDY = None  # SamplingParams(), set in main after the imports


# Model shapes (random weights, the bundled tokenizer): the tiny one's decode step is mostly fixed
# per-step cost on a CPU, so a batch of 16 costs little more than a batch of 8; the small one's
# per-row compute weighs more, as a real model's does.
QUICK = {"users": 4, "turns": 1, "new_tokens": 16, "limit_s": 30.0}
SHAPES = {"tiny": {}, "small": {"hidden_size": 768, "intermediate_size": 1536, "num_hidden_layers": 8}}


def rambler_checkpoint(out: Path, shape: str) -> Path:
    """A Falcon Mamba of `shape` with random weights and the bundled tiny tokenizer."""
    from dataclasses import replace

    import torch
    from transformers import FalconMambaForCausalLM

    from fm_demo.settings import tiny_checkpoint
    from fm_demo.tiny.config import TinyDims, falcon_mamba_config

    out = out / f"falcon-mamba-{shape}-random"
    out.mkdir()
    for f in Path(tiny_checkpoint("instruct")).iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    torch.manual_seed(0)
    config = falcon_mamba_config(replace(TinyDims(), **SHAPES[shape]), "instruct")
    FalconMambaForCausalLM(config).save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_states() -> dict[str, int]:
    from ray import serve

    states = serve.status().applications[APP].deployments["FalconMamba"].replica_states
    return {k: v for k, v in states.items() if v}


def deploy(args: dict, replicas: int, timeout_s: float = 300.0):
    """The app with exactly `replicas` model replicas; the ingress's models in this process."""
    from ray import serve

    from fm_demo.cluster.app import build_app
    from fm_demo.cluster.config import IngressSettings, settings_env
    from fm_demo.cluster.remote import RemoteModelManager

    given = {**args, "cluster_min_replicas": replicas, "cluster_max_replicas": replicas}
    serve.run(build_app(given), name=APP, route_prefix="/")
    end = time.monotonic() + timeout_s
    while replica_states() != {"RUNNING": replicas}:  # settled: none starting or stopping
        if time.monotonic() > end:
            raise RuntimeError(f"{replicas} replicas did not start in {timeout_s:.0f} s")
        time.sleep(0.5)
    handle = serve.get_deployment_handle("FalconMamba", APP)
    settings = IngressSettings.for_replicas(settings_env(given), handle.resolved.remote().result(), replicas)
    manager = RemoteModelManager(settings, handle, 64 << 20)
    return settings, manager.get(args["default_preset"])


def conversation(lm, settings, name: str, turns: int, new_tokens: int, deadline: float) -> tuple[int, object]:
    from fm_demo.conversations.sessions import Conversation

    conv = Conversation(lm, settings, namespace=name)
    tokens = 0
    for t in range(turns):
        if time.monotonic() > deadline:
            break
        for ev in conv.send(f"Turn {t} of {name}: tell me a long story about rivers and mountains.",
                            GREEDY, new_tokens):
            pass
        tokens += conv.last_metrics.new_tokens
    return tokens, conv


def throughput(lm, settings, users: int, turns: int, new_tokens: int, limit_s: float) -> float:
    """Generated tokens per second with `users` conversations at once (after one warm-up each)."""
    deadline = time.monotonic() + limit_s
    with ThreadPoolExecutor(users) as pool:  # warm-up: every replica has read and written once
        list(pool.map(lambda i: conversation(lm, settings, f"warm-{i}", 1, 8, deadline), range(users)))
        t0 = time.perf_counter()
        done = list(pool.map(lambda i: conversation(lm, settings, f"user-{i}-{t0}", turns, new_tokens,
                                                    deadline), range(users)))
        elapsed = time.perf_counter() - t0
    return sum(n for n, _ in done) / elapsed


def recovery(lm, settings, turns: int, new_tokens: int) -> dict:
    """Kill the replica of a conversation; time its next turn's first token elsewhere."""
    import ray

    _, conv = conversation(lm, settings, "recover", turns, new_tokens, time.monotonic() + 120)
    lost = conv.last_metrics.served_by.removeprefix("replica ")
    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#FalconMamba#{lost}", namespace="serve")
    ray.kill(actor, no_restart=True)
    moved_before = lm.runner.stats().get("moved_bytes", 0)
    t0 = time.perf_counter()
    events = conv.send("The replica that held this conversation is gone. Go on.", GREEDY, new_tokens)
    next(events)
    first_token_s = time.perf_counter() - t0
    for _ in events:
        pass
    m = conv.last_metrics
    moved = lm.runner.stats().get("moved_bytes", 0) - moved_before
    return {"recover_s": first_token_s, "moved_bytes": moved, "context_tokens": m.reused_tokens,
            "served_by": m.served_by, "lost": lost, "state_source": m.state_source}


def batching_bound(ckpt: Path, users: int, steps: int = 30) -> float:
    """t(users) / t(users / 2) of one decode step on one torch thread: the most a second replica can
    add when the users split evenly (a step of half the rows is not half the cost: much of it is
    per step, not per row)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fm_demo.engine import Engine

    torch.set_num_threads(1)
    engine = Engine(AutoModelForCausalLM.from_pretrained(ckpt).eval())
    times = {}
    for rows in (users, max(1, users // 2)):
        state = engine.new_state(batch_size=rows)
        ids = torch.zeros(rows, dtype=torch.long)
        for _ in range(3):
            engine.decode_step(ids, state.conv, state.ssm)
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.decode_step(ids, state.conv, state.ssm)
        times[rows] = time.perf_counter() - t0
    return times[users] / times[max(1, users // 2)]


def main() -> None:
    global GREEDY
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                        help="model shape (random weights)")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--limit-s", type=float, default=90.0, help="time limit of each throughput run")
    parser.add_argument("--quick", action="store_true", help="a smoke run: " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    opts = parser.parse_args()
    if opts.quick:  # quick values where the flag was left at its default
        for k, v in QUICK.items():
            if getattr(opts, k) == parser.get_default(k):
                setattr(opts, k, v)
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    try:
        import ray
        from ray import serve
    except ImportError as e:
        why = f"Ray Serve is not installed ({e}); pip install -r requirements-cluster.txt"
        print(json.dumps({"skipped": why}))
        return

    from fm_demo.engine import SamplingParams
    from fm_demo.metrics import kv_cache_bytes

    GREEDY = SamplingParams()
    say = (lambda *a: None) if opts.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    # stdout carries the JSON only: Ray's own messages (a killed replica's tasks) go to stderr
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        ckpt = rambler_checkpoint(Path(tmp), opts.shape)
        bound = batching_bound(ckpt, opts.users)
        say(f"a decode step of {opts.users} rows costs {bound:.2f}x one of {opts.users // 2}")
        args = {"extra_models": f"{ckpt}:instruct", "default_preset": ckpt.name, "cpu_threads": 1,
                "cluster_replica_cpus": 1, "max_new_tokens": opts.new_tokens}
        ray.init(num_cpus=opts.cpus, object_store_memory=200 << 20, include_dashboard=False,
                 log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
            rates = {}
            for replicas in (1, 2):
                settings, lm = deploy(args, replicas)
                rates[str(replicas)] = throughput(lm, settings, opts.users, opts.turns, opts.new_tokens,
                                                  opts.limit_s)
                say(f"{replicas} replica(s): {rates[str(replicas)]:,.0f} tok/s")
            rec = recovery(lm, settings, opts.turns, opts.new_tokens)
            say(f"recovered on {rec['served_by']} ({rec['state_source']}) in {rec['recover_s']:.3f} s")
        finally:
            serve.shutdown()
            ray.shutdown()
    result = {"agg_tok_s": rates, "recover_s": rec["recover_s"], "moved_bytes": rec["moved_bytes"],
              "kv_bytes_same_length": kv_cache_bytes(rec["context_tokens"]),
              "context_tokens": rec["context_tokens"], "speedup": rates["2"] / rates["1"],
              "users": opts.users,
              "batching_bound": bound, "shape": opts.shape, "state_bytes": lm.engine.state_nbytes()}
    print(json.dumps(result, indent=None if opts.json else 2))


if __name__ == "__main__":
    main()
