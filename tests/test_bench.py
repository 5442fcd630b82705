"""Every benchmark in bench/ runs: `--quick --json` as a subprocess prints one JSON object with the
keys of the full run, numbers that make sense, and replies that equal their solo replies.

The quick runs take about 2.5 minutes together on two busy cores (the cluster one about a minute of
it, Ray's start-up mostly); each has a timeout, so a hang fails its test instead of the suite.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, *args: str, timeout: float = 300, env: dict | None = None) -> dict:
    """bench/<name>.py --quick --json: exit status 0 and stdout one JSON object, which is returned."""
    cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick", "--json", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert proc.returncode == 0, f"{name}.py exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout)
    assert isinstance(out, dict)
    return out


def numbers(tree, path: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON tree (not booleans) with its path."""
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in numbers(v, f"{path}.{k}")]
    if isinstance(tree, list):
        return [x for i, v in enumerate(tree) for x in numbers(v, f"{path}[{i}]")]
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return [(path, tree)]
    return []


def all_finite(tree) -> None:
    bad = [(p, v) for p, v in numbers(tree) if not math.isfinite(v)]
    assert not bad, bad


def positive(*values: float) -> None:
    assert all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values), values


def test_engine_quick():
    out = run_bench("engine", timeout=240)
    assert set(out) == {"decode_tok_s", "chunked_peak_rss_mb", "parallel_peak_rss_mb",
                        "chunked_rss_increase_mb", "parallel_rss_increase_mb", "prefill_tok_s_4k", "meta",
                        "summary"}
    all_finite(out)
    for name in ("3M", "130M"):
        r = out["decode_tok_s"][name]
        positive(r["engine"], r["generate"], r["ratio"], r["params"])
    for n in ("1024", "4096"):
        positive(out["chunked_peak_rss_mb"][n], out["parallel_peak_rss_mb"][n])
    positive(out["prefill_tok_s_4k"]["chunked"], out["prefill_tok_s_4k"]["parallel"],
             out["summary"]["prefill_ratio_4k"])


def test_multiturn_quick():
    out = run_bench("multiturn", timeout=120)
    assert {"ttft_cached_s", "ttft_reencode_s", "history_tokens", "prompt_tokens", "first_token_match",
            "model", "device", "threads", "repeats", "final_history_tokens", "cached_last_over_first",
            "reencode_over_cached_last", "targets_met"} == set(out)
    all_finite(out)
    assert len(out["ttft_cached_s"]) == len(out["ttft_reencode_s"]) == 4
    positive(*out["ttft_cached_s"], *out["ttft_reencode_s"], out["final_history_tokens"])
    assert out["first_token_match"]  # the cached state's first token is the re-read one's
    assert out["history_tokens"] == sorted(out["history_tokens"]) and out["history_tokens"][0] == 0


def test_prefix_quick():
    out = run_bench("prefix", timeout=240)
    assert set(out) == {"shared_doc", "shared_doc_memory", "api_chat", "shared_system", "doc_in_message",
                        "targets"}
    all_finite(out)
    sd = out["shared_doc"]
    positive(sd["doc_tokens"], sd["ttft_first_s"], sd["ttft_second_s"])
    assert 0 <= sd["cached_fraction"] <= 1
    mem = out["shared_doc_memory"]
    assert mem["conversations"] == 10 and mem["state_copies"] >= 1 and mem["holders_of_that_state"] >= 1
    chat = out["api_chat"]
    assert len(chat["ttft_s"]) == len(chat["ttft_nocache_s"]) == len(chat["cached_tokens"]) == 4
    positive(*chat["ttft_s"], *chat["ttft_nocache_s"])
    assert all(0 <= c <= p for c, p in zip(chat["cached_tokens"], chat["prompt_tokens"]))

    for key, shared, n in (("shared_system", "system_tokens", 4), ("doc_in_message", "doc_tokens", 3)):
        r = out[key]
        assert {shared, "requests", "prompt_tokens", "cached_tokens", "cached_fraction", "ttft_first_s",
                "ttft_rest_s", "ttft_s", "first_over_rest", "cache_bytes_added"} <= set(r), key
        assert r["requests"] == len(r["ttft_s"]) == len(r["cached_tokens"]) == n
        positive(r["ttft_first_s"], r["ttft_rest_s"], *r["ttft_s"])
        assert 0 <= r["cached_fraction"] <= 1
        # the shared start is most of every prompt (1k and 2k tokens in quick mode), and no request
        # is served more from the cache than its whole prompt
        assert 0.9 * min(r["prompt_tokens"]) <= r[shared] < min(r["prompt_tokens"])
        assert all(0 <= c <= p for c, p in zip(r["cached_tokens"], r["prompt_tokens"]))
    doc = out["doc_in_message"]
    assert doc["checkpoint_bytes"] >= 0 and doc["cache_bytes_total"] >= doc["checkpoint_bytes"]
    assert all(isinstance(v, bool) for v in out["targets"].values())


SERVE_KEYS = {"device", "threads", "max_new_tokens", "sampling", "path", "models", "prefill_interference",
              "max_batch", "prefill_budget", "short_during_long_read", "context_decode_engine", "http", "targets"}


def test_serve_quick():
    out = run_bench("serve", timeout=300)
    assert set(out) == SERVE_KEYS
    all_finite(out)
    max_new = out["max_new_tokens"]
    assert set(out["models"]) == {"tiny-shape", "random-22m"}
    for name, m in out["models"].items():
        assert m["identical_to_solo"] and not m["mismatches"], (name, m["mismatches"])
        assert set(m["streams"]) == {"1", "4", "16"}
        for n, r in m["streams"].items():
            positive(r["agg_tok_s"], r["per_stream_tok_s"], r["p95_itl_s"], r["ttft_s"])
            assert r["errors"] == 0 and r["min_new_tokens"] == max_new, (name, n)
        positive(*m["engine_step_ms"].values())
    for name, r in out["prefill_interference"]["by_model"].items():
        assert r["identical_to_solo"] and r["errors"] == 0, name
        positive(r["p95_itl_without_s"], r["p95_itl_with_s"], r["ratio"], r["read_alone_tok_s"])

    short = out["short_during_long_read"]
    positive(short["ttft_idle_s"], short["ttft_during_read_s"], short["ratio"])
    assert short["ratio"] == pytest.approx(short["ttft_during_read_s"] / short["ttft_idle_s"])
    assert short["same_tokens_as_idle"] and short["errors"] == 0 and short["decoded_tokens"] > 0
    assert 0 < short["long_read_tokens_when_sent"] <= short["long_read_tokens_at_first_token"]
    assert short["long_read_tokens_at_first_token"] <= short["long_prompt_tokens"] == 8192
    assert short["streams"] == 4 and short["short_prompt_tokens"] == 20

    engine_ctx = out["context_decode_engine"]
    assert engine_ctx["contexts"] == [0, 2048] and set(engine_ctx["decode_tok_s"]) == {"0", "2048"}
    positive(*engine_ctx["decode_tok_s"].values(), *engine_ctx["ratio_to_0"].values())

    http = out["http"]
    assert http["users"] == 4
    for kind in ("gradio", "v1"):
        r = http[kind]
        assert r["identical_to_solo"] and not r["mismatched_users"], kind
        assert r["min_new_tokens"] == max_new and r["tokens"] == 4 * max_new, kind
        positive(r["concurrent_agg_tok_s"], r["one_by_one_agg_tok_s"], r["ratio"], r["ttft_concurrent_s"])
    ctx = http["context_decode"]
    assert ctx["contexts"] == [0, 2048] and set(ctx["decode_tok_s"]) == {"0", "2048"}
    positive(*ctx["decode_tok_s"].values(), *ctx["ratio_to_0"].values())
    assert ctx["prompt_tokens"]["2048"] >= 2048 > ctx["prompt_tokens"]["0"]


CLUSTER_KEYS = {"agg_tok_s", "recover_s", "moved_bytes", "kv_bytes_same_length", "context_tokens", "speedup",
                "users", "batching_bound", "shape", "state_bytes"}


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray Serve is not installed")
def test_cluster_quick():
    out = run_bench("cluster", timeout=300)
    assert set(out) == CLUSTER_KEYS
    all_finite(out)
    positive(out["agg_tok_s"]["1"], out["agg_tok_s"]["2"], out["recover_s"], out["speedup"],
             out["batching_bound"])
    assert out["users"] == 4 and out["moved_bytes"] > 0  # the state the other replica resumed from


def test_cluster_without_ray_says_it_skipped(tmp_path):
    """A `ray` that fails to import (shadowing the installed one) stands for a machine without it."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('no Ray here')\n")
    out = run_bench("cluster", timeout=60, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert set(out) == {"skipped"} and "no Ray here" in out["skipped"]


SEVEN_B_KEYS = {"load_s", "rss_bytes", "estimate_bytes", "state_values", "decode_tok_s", "bandwidth_bound_tok_s",
                "ttft_turn1_s", "ttft_turn10_s"}


def test_seven_b_quick():
    """The 7B bench's own code at 2 layers of the 7B's shape."""
    out = run_bench("seven_b")
    assert set(out) == SEVEN_B_KEYS and set(out["decode_tok_s"]) == {"1", "4"}
    all_finite(out)
    assert out["state_values"] == 2 * 8192 * (16 + 3)
    assert out["estimate_bytes"] == 1_486_610_432  # 2 layers of the 7B and its embeddings, in bf16
    assert 0.75 < out["estimate_bytes"] / out["rss_bytes"] < 1.25  # resident bytes move with the allocator
    positive(out["load_s"], out["bandwidth_bound_tok_s"], out["ttft_turn1_s"], out["ttft_turn10_s"],
             *out["decode_tok_s"].values())


def test_constraints_quick():
    """bench/constraints.py: each grammar library installed masks a valid reply's every token (the
    bench asserts it) and reports its costs; the app's library is always there."""
    out = run_bench("constraints")
    assert out["chosen"] == "llguidance" and set(out["libraries"]) == {"llguidance", "xgrammar", "outlines-core"}
    for name, lib in out["libraries"].items():
        if "skipped" in lib:
            assert name != out["chosen"] and "not installed" in lib["skipped"]
            continue
        deep = lib.pop("deep_schema", None)
        assert set(lib) == {"tokenizer_ms", "compile_ms", "mask_us_b1", "mask_us_b16", "reply_tokens"}
        positive(*lib.values())
        if name == out["chosen"]:  # a hostile schema is refused quickly, in process
            assert deep["outcome"] == "refused" and deep["s"] < 5
    assert "skipped" not in out["libraries"]["llguidance"]


def test_api_quick():
    """bench/api.py: constrained against unconstrained decode, n=8 from one read, echo scoring memory."""
    out = run_bench("api", timeout=300)
    assert set(out) == {"constrained", "n", "echo"}
    all_finite(out)
    c, n, echo = out["constrained"], out["n"], out["echo"]
    assert {"tok_s_b1", "tok_s_b16", "unconstrained_tok_s_b1", "unconstrained_tok_s_b16"} <= set(c), c
    positive(*(c[k] for k in ("tok_s_b1", "tok_s_b16", "unconstrained_tok_s_b1", "unconstrained_tok_s_b16")))
    assert {"ttft_n1_s", "ttft_n8_s", "prompt_tokens_read_n8", "prompt_tokens"} <= set(n)
    assert n["prompt_tokens_read_n8"] == n["prompt_tokens"]  # eight replies, one read
    positive(n["ttft_n1_s"], n["ttft_n8_s"])
    assert {"peak_bytes_1k", "peak_bytes_32k"} <= set(echo) and echo["peak_bytes_32k"] < 1.5 * echo["peak_bytes_1k"]


CPU_PEER_KEYS = {"ours", "llama_cpp", "same_greedy_tokens", "ratio", "params"}


def test_cpu_peer_quick():
    """bench/cpu_peer.py: this engine against llama.cpp on the same random weights. Without
    llama-cpp-python or gguf (CI installs neither) it must say which package is missing; with them,
    both engines' figures and the same greedy tokens."""
    missing = [m for m in ("llama_cpp", "gguf") if importlib.util.find_spec(m) is None]
    out = run_bench("cpu_peer", timeout=300)
    if missing:
        assert set(out) == {"skipped"}
        assert ("llama-cpp-python" if "llama_cpp" in missing else "gguf") in out["skipped"]
        assert "requirements-bench.txt" in out["skipped"]
        return
    assert {"threads", "models"} <= set(out) and out["threads"] == 1 and set(out["models"]) == {"tiny"}
    all_finite(out)
    r = out["models"]["tiny"]
    assert CPU_PEER_KEYS <= set(r)
    for side in ("ours", "llama_cpp"):
        assert set(r[side]) == {"decode_tok_s", "prefill_tok_s"}
        positive(*r[side].values())
    assert r["same_greedy_tokens"] is True


def test_cpu_peer_without_llama_cpp_says_it_skipped(tmp_path):
    """A `llama_cpp` that fails to import stands for a machine without llama-cpp-python."""
    (tmp_path / "llama_cpp").mkdir()
    (tmp_path / "llama_cpp" / "__init__.py").write_text("raise ImportError('no llama.cpp here')\n")
    out = run_bench("cpu_peer", timeout=60, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert set(out) == {"skipped"} and "llama-cpp-python" in out["skipped"] and "no llama.cpp here" in out["skipped"]
