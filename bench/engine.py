"""Engine benchmark against transformers on the same model, in one run. Prints JSON.

    python bench/engine.py --json [--quick]

- decode_tok_s: greedy decode of 256 new tokens, engine.stream vs model.generate with its cache,
  on a ~3M and a ~130M parameter random FalconMamba config (best of --repeats runs each).
- chunked_peak_rss_mb / parallel_peak_rss_mb: peak RSS of a fresh process that reads a prompt of
  each length by chunked prefill vs one parallel transformers forward (tiny config). A length the
  parallel forward cannot fit in --rss-limit-gb is reported as null.
- prefill_tok_s_4k: prompt tokens/s at 4k tokens, chunked vs parallel.
Figures are ratios against the peer measured in the same run; absolute times vary with the machine.
Both sides run with the same --threads (default 1): at batch 1 a small model's matmuls are too
small to gain from intra-op threads, and on a shared 2-core machine extra threads only add noise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {
    "3M": dict(hidden_size=256, num_hidden_layers=4, vocab_size=4096),
    "130M": dict(hidden_size=768, num_hidden_layers=24, vocab_size=50304),
}
TINY = dict(hidden_size=64, num_hidden_layers=2, vocab_size=512)
LENGTHS = [1024, 4096, 16384, 65536]


def decode_tok_s(name: str, new_tokens: int, repeats: int) -> dict[str, float]:
    import torch

    from fm_demo.engine import Engine, SamplingParams, tiny_model

    model = tiny_model(seed=0, **CONFIGS[name])
    params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    engine = Engine(model)

    def run_engine() -> float:
        t0 = time.perf_counter()
        n = sum(1 for _ in engine.stream(prompt, engine.new_state(), SamplingParams(), new_tokens))
        return n / (time.perf_counter() - t0)

    def run_generate() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=0)
        return (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t0)

    run_engine(), run_generate()  # warm-up
    eng, gen = [], []
    for _ in range(repeats):  # interleaved so both see the same machine load
        eng.append(run_engine())
        gen.append(run_generate())
    return {"engine": max(eng), "generate": max(gen), "ratio": max(eng) / max(gen), "params": params}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _child(mode: str, length: int, threads: int) -> None:
    """Runs in a fresh process: read `length` tokens one way, print peak RSS and time.

    The kernel's high-water mark is reset after imports and model set-up (clear_refs = 5), so the
    peak is that of the prompt read, not of start-up.
    """
    import torch

    from fm_demo.engine import Engine, tiny_model

    torch.set_num_threads(threads)
    model = tiny_model(seed=0, **TINY)
    ids = torch.randint(0, TINY["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0))
    engine = Engine(model, chunk_size=256)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    if mode == "chunked":
        engine.prefill(ids, engine.new_state())
    else:
        with torch.inference_mode():
            model(ids, use_cache=False, logits_to_keep=1)
    dt = time.perf_counter() - t0
    print(json.dumps({"peak_rss_mb": _status_mb("VmHWM"), "baseline_rss_mb": base, "seconds": dt}))


def measure(mode: str, length: int, limit_gb: float, threads: int) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--child", mode, str(length)]
    limit = f"ulimit -v {int(limit_gb * 1024 * 1024)}; " if limit_gb > 0 else ""
    proc = subprocess.run(["bash", "-c", limit + " ".join(cmd)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_section(lengths: list[int], limit_gb: float, threads: int) -> dict:
    """Peak RSS per prompt length, plus the part above the process's RSS before the prompt was read
    (imports and weights dominate the absolute figure on a model this small)."""
    out = {k: {} for k in ("chunked_peak_rss_mb", "parallel_peak_rss_mb",
                           "chunked_rss_increase_mb", "parallel_rss_increase_mb")}
    speed = {}
    for n in lengths:
        for mode in ("chunked", "parallel"):
            r = measure(mode, n, limit_gb, threads)
            out[f"{mode}_peak_rss_mb"][n] = r and round(r["peak_rss_mb"], 1)
            out[f"{mode}_rss_increase_mb"][n] = r and round(r["peak_rss_mb"] - r["baseline_rss_mb"], 1)
            if n == 4096:
                speed[mode] = r and n / r["seconds"]
    return {**out, "prefill_tok_s_4k": speed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object (the default output)")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and lengths, for a smoke run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rss-limit-gb", type=float, default=16.0, help="address-space cap per child")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args.child[0], int(args.child[1]), args.threads)
    import torch

    torch.set_num_threads(args.threads)
    new_tokens = 32 if args.quick else 256
    lengths = [1024, 4096] if args.quick else LENGTHS
    out = {"decode_tok_s": {name: decode_tok_s(name, new_tokens, args.repeats) for name in CONFIGS}}
    out.update(memory_section(lengths, args.rss_limit_gb, args.threads))
    out["meta"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "new_tokens": new_tokens,
                   "tiny_config": TINY, "chunk_size": 256}
    c, p = out["chunked_peak_rss_mb"], out["parallel_peak_rss_mb"]
    lo, hi = lengths[0], lengths[-1]
    out["summary"] = {
        "decode_ratio": {k: v["ratio"] for k, v in out["decode_tok_s"].items()},
        "chunked_rss_growth": c[hi] / c[lo] - 1 if c[lo] and c[hi] else None,
        "parallel_rss_growth": p[hi] / p[lo] - 1 if p[lo] and p[hi] else None,
        "chunked_increase_mb": [out["chunked_rss_increase_mb"][n] for n in lengths],
        "parallel_increase_mb": [out["parallel_rss_increase_mb"][n] for n in lengths],
        "prefill_ratio_4k": (out["prefill_tok_s_4k"]["chunked"] / out["prefill_tok_s_4k"]["parallel"]
                             if all(out["prefill_tok_s_4k"].values()) else None),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
