"""Falcon Mamba 7B's full shape on this machine: load, memory, state, decode against the bandwidth
bound, and time to first token deep into a conversation. Prints JSON.

    python bench/seven_b.py --json                 # 64 layers, bf16, CPU (~15 GB of RAM)
    python bench/seven_b.py --quick --json         # the same code at 2 layers, in seconds
    python bench/seven_b.py --device cuda --json   # on a GPU (scripts/gpu_check.sh runs it)

The model is the published tiiuae/falcon-mamba-7b config (kernels_check/falcon-mamba-7b.config.json)
with random weights, built in place in bf16 (kernels_check/models.py: no download, no checkpoint
on disk, the weights allocated once), paired with the bundled tiny tokenizer; lm_head's rows of ids
the tokenizer lacks and of its special tokens are zeroed, so greedy replies use only ids it can
write and never stop early. It is served as the app serves a model: a LoadedModel whose batched
runner (serving/scheduler.py) takes every request, and Conversations over it.

  load_s                 building the model in place (on a real load: reading the checkpoint)
  rss_bytes              memory the model added: the process's resident bytes after minus before
                         (on CUDA, the bytes the allocator gave it)
  estimate_bytes         the model manager's estimate for it (models.estimate_model_bytes)
  state_values           values in one sequence's recurrent state: layers x 8192 x (16 ssm + 3 conv)
  decode_tok_s           {"1", "4"}: greedy tokens/s of 1 request, and of 4 at once in total,
                         through the scheduler (each request's rate from its own token times)
  bandwidth_bound_tok_s  memory bandwidth (a large-array copy in this run: bytes read + written per
                         second) / weight bytes a decode step reads (kernels_check.models.
                         bytes_read_per_token); one step of 4 rows reads them once, so 4 rows'
                         bound is 4x this
  ttft_turn1_s, ttft_turn10_s   time to first token of turn 1 and turn 10 of one conversation of
                         short turns: each turn reads only its new tokens from the kept state
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fm_demo.conversations.sessions import Conversation  # noqa: E402
from fm_demo.engine import Engine, SamplingParams  # noqa: E402
from fm_demo.models import LoadedModel, estimate_model_bytes, make_runner  # noqa: E402
from fm_demo.serving import Request  # noqa: E402
from fm_demo.serving.prefix_cache import PrefixCache  # noqa: E402
from fm_demo.settings import Preset, Settings, tiny_checkpoint  # noqa: E402
from kernels_check.models import build_random_model, bytes_read_per_token, config_7b, confine_head_  # noqa: E402

KEYS = ("load_s", "rss_bytes", "estimate_bytes", "state_values", "decode_tok_s", "bandwidth_bound_tok_s",
        "ttft_turn1_s", "ttft_turn10_s")
COPY_BYTES = 1 << 30  # per array: far beyond any cache, and 2 GiB in all, freed before the model is built
TURNS = 10
BATCH = 4


# -- the machine ---------------------------------------------------------------------------------
def copy_bandwidth(device: str, nbytes: int = COPY_BYTES, reps: int = 5) -> float:
    """Bytes per second a large-array copy moves (each byte read once and written once), best of reps."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def model_memory(device: str) -> int:
    """Resident bytes of the process (CPU) or bytes the CUDA allocator holds."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    import psutil

    return psutil.Process().memory_info().rss


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- the model, served as the app serves it ------------------------------------------------------
def build(layers: int, device: str, settings: Settings) -> tuple[LoadedModel, dict]:
    """The 7B config at `layers` layers, random bf16 weights built in place, behind a batched runner."""
    from transformers import AutoTokenizer

    config = config_7b()
    config.num_hidden_layers = layers
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("instruct"))
    before = model_memory(device)
    t0 = time.perf_counter()
    model = build_random_model(config, device, torch.bfloat16)
    confine_head_(model, len(tokenizer), [*tokenizer.all_special_ids, config.eos_token_id])
    _sync(device)
    load_s = time.perf_counter() - t0
    figures = {"load_s": load_s, "rss_bytes": model_memory(device) - before,
               "estimate_bytes": estimate_model_bytes(config, "bf16", device)}
    engine = Engine(model, chunk_size=settings.chunk_size)
    preset = Preset("7b-shape", f"Falcon Mamba 7B shape, {layers} layers, random weights", "random", "instruct",
                    ("bf16",), "bf16")
    key = (preset.key, "bf16")
    cache = PrefixCache(settings.session_budget_bytes, settings.share_prefix_cache)
    lm = LoadedModel(key, preset, "bf16", model, tokenizer, engine, int(model.get_memory_footprint()), load_s,
                     runner=make_runner(engine, None, key, settings, cache), prefix_cache=cache)
    return lm, figures


# -- measurements --------------------------------------------------------------------------------
def prompt(i: int, n: int = 16) -> list[int]:
    """A prompt of n token ids of the tokenizer's range, different per request."""
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(0, 1000, (n,), generator=g).tolist()


def decode_rate(lm: LoadedModel, n_requests: int, new_tokens: int) -> float:
    """Greedy tokens/s of n requests submitted at once, summed over the requests. Each request's
    rate is (tokens - 1) / the time from its first token to its last (the scheduler's own
    timings), so prompt reading is left out."""
    replies = [lm.runner.submit(Request(prompt(i), namespace=f"decode-{n_requests}-{i}",
                                        max_new_tokens=new_tokens, cache=False))
               for i in range(n_requests)]
    rates = []
    for reply in replies:
        last = list(reply.tokens())[-1]
        if last.metrics.batch_mean < n_requests * 0.75:  # they must have shared the steps
            raise RuntimeError(f"{n_requests} requests ran {last.metrics.batch_mean:.1f} rows a step")
        rates.append(last.metrics.decode_tok_s)
    return sum(rates)


def conversation_ttft(lm: LoadedModel, settings: Settings, turns: int, reply_tokens: int) -> list[float]:
    """Time to first token of each turn of one conversation of short messages."""
    conv = Conversation(lm, settings)
    out = []
    for i in range(turns):
        *_, done = conv.send(f"Turn {i + 1}: tell me one more thing about falcons.", SamplingParams(),
                             reply_tokens)
        out.append(done.metrics.ttft_s)
    return out


def run(layers: int, device: str, new_tokens: int, reply_tokens: int, threads: int) -> dict:
    if device == "cpu":
        torch.set_num_threads(threads)
    bandwidth = copy_bandwidth(device)  # before the model exists, so the two never share memory
    settings = Settings(device=device, max_batch=BATCH, max_new_tokens=max(new_tokens, reply_tokens))
    lm, out = build(layers, device, settings)
    try:
        c = lm.engine.config
        state = lm.engine.new_state()
        out["state_values"] = state.conv.numel() + state.ssm.numel()
        out["bandwidth_bound_tok_s"] = bandwidth / bytes_read_per_token(lm.model)
        decode_rate(lm, 1, 2)  # warm-up: first calls, allocator
        out["decode_tok_s"] = {str(n): decode_rate(lm, n, new_tokens) for n in (1, BATCH)}
        ttft = conversation_ttft(lm, settings, TURNS, reply_tokens)
        out["ttft_turn1_s"], out["ttft_turn10_s"] = ttft[0], ttft[-1]
        print(f"{layers} layers on {device} ({threads} threads): bandwidth {bandwidth / 1e9:.1f} GB/s, "
              f"{bytes_read_per_token(lm.model) / 1e9:.2f} GB read per step; state "
              f"{out['state_values']:,} values vs {c.num_hidden_layers} x {c.intermediate_size} x "
              f"({c.state_size} + {c.conv_kernel - 1}); estimate / rss {out['estimate_bytes'] / out['rss_bytes']:.3f}; "
              f"decode at 1 row {out['decode_tok_s']['1'] / out['bandwidth_bound_tok_s']:.0%} of the bound; "
              f"TTFT per turn {', '.join(f'{t * 1e3:.0f}' for t in ttft)} ms", file=sys.stderr)
    finally:
        lm.runner.close()
    return {k: out[k] for k in KEYS}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 layers instead of 64: the same code in seconds")
    p.add_argument("--layers", type=int, default=0, help="layers of the 7B config to build (0: 64, or 2 with --quick)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens per request in the decode runs")
    p.add_argument("--reply-tokens", type=int, default=4, help="tokens per conversation turn")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch CPU threads (default: every core; memory bandwidth needs more than one)")
    p.add_argument("--json", action="store_true", help="print one JSON object (a summary goes to stderr)")
    args = p.parse_args(argv)
    layers = args.layers or (2 if args.quick else 64)
    out = run(layers, args.device, args.new_tokens, args.reply_tokens, args.threads)
    print(json.dumps(out, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
