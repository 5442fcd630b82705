"""GPU timings: per-op fused vs reference, and batch-1 decode of a 7B-shaped random model.

Decode speed is set by memory bandwidth: each token reads every weight once. The bound is
    tokens/s <= HBM bandwidth / (weight bytes read per token + 2 x state bytes)
with the state read and written once per token. Decode is timed through Engine.step, exactly as
the app decodes (greedy token fed back, id validation included), with and without CUDA graphs.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

from fm_demo.engine import REFERENCE, Engine, OpSet
from fm_demo.engine.kernels import OP_NAMES
from fm_demo.engine.state import state_bytes

from .checks import CASES, REF_OPS
from .env import gpu_info
from .models import build_random_model, bytes_read_per_token, config_7b, quantize_4bit_

OP_SHAPES_7B = {"conv": {"B": 1, "D": 8192, "T": 256, "N": 16, "K": 4},
                "scan": {"B": 1, "D": 8192, "T": 256, "N": 16, "K": 4},
                "conv_update": {"B": 1, "D": 8192, "N": 16, "K": 4},
                "state_update": {"B": 1, "D": 8192, "N": 16, "K": 4}}
DECODE_TOKENS = {"eager": 12, "graph": 64}
PROMPT_TOKENS = 16


def cuda_time_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 15) -> float:
    """Median milliseconds of fn() on the current stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_ops(fused: OpSet | None, device: str) -> list[dict]:
    """Each op at the 7B's shapes in bf16 (prefill chunk of 256 tokens, one decode token)."""
    rows = []
    for op in OP_NAMES:
        shape = OP_SHAPES_7B[op]
        case = CASES[op][0](shape, torch.bfloat16, device, torch.Generator(device=device).manual_seed(0))
        ref_ms = cuda_time_ms(lambda: case(REF_OPS[op]))
        row = {"op": op, "shape": shape, "dtype": "bfloat16", "reference_ms": round(ref_ms, 4),
               "fused_ms": None, "speedup": None, "impl": "reference"}
        if fused is not None and fused.paths[op] != "reference":
            fused_ms = cuda_time_ms(lambda: case(getattr(fused, op)))
            row.update(fused_ms=round(fused_ms, 4), speedup=round(ref_ms / fused_ms, 2), impl=fused.paths[op])
        rows.append(row)
    return rows


def decode_rate(engine: Engine, n_tokens: int) -> dict:
    """Greedy batch-1 decode through Engine.step: ms per token and tokens/s."""
    state = engine.new_state(1)
    ids = torch.arange(PROMPT_TOKENS, device=engine.device).unsqueeze(0) % engine.config.vocab_size
    logits = engine.prefill(ids, state)
    for _ in range(3):  # warm-up (and graph capture on the first step)
        logits = engine.step(logits.argmax(-1), state)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        logits = engine.step(logits.argmax(-1), state)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"ms_per_token": round(1e3 * seconds / n_tokens, 3), "tok_s": round(n_tokens / seconds, 1),
            "finite": bool(torch.isfinite(logits).all())}


def _engine(model, ops: OpSet | None, graphs: bool) -> Engine:
    return Engine(model, ops=ops, cuda_graphs=graphs)


def _decode_rows(model, label: str, opsets: dict[str, OpSet | None], bound_tok_s: float | None) -> list[dict]:
    rows = []
    for path, ops in opsets.items():
        for graphs in (False, True):
            engine = _engine(model, ops, graphs)
            rate = decode_rate(engine, DECODE_TOKENS["graph" if graphs else "eager"])
            status = engine.kernel_report()["decode_graph"] if graphs else "off"
            frac = round(rate["tok_s"] / bound_tok_s, 3) if bound_tok_s else None
            rows.append({"weights": label, "ops": path, "cuda_graph": status, **rate, "fraction_of_bound": frac})
            del engine
            gc.collect()
    return rows


def _bound(model, bandwidth_tb_s: float | None) -> dict:
    cfg = model.config
    state = state_bytes(cfg, model.backbone.embeddings.weight.dtype)
    per_token = bytes_read_per_token(model) + 2 * state
    tok_s = bandwidth_tb_s * 1e12 / per_token if bandwidth_tb_s else None
    return {"bytes_per_token": per_token, "bandwidth_tb_s": bandwidth_tb_s,
            "bound_tok_s": round(tok_s, 1) if tok_s else None}


def bench_decode_7b(fused: OpSet | None, device: str, packages: dict) -> dict:
    """bf16 (reference and fused ops, eager and graphed), then NF4 4-bit where bitsandbytes runs."""
    gpu = gpu_info() or {}
    t0 = time.perf_counter()
    model = build_random_model(config_7b(), device, torch.bfloat16)
    out = {"model": "falcon-mamba-7b shape, random weights", "build_s": round(time.perf_counter() - t0, 1),
           "gpu_memory_gib": round(torch.cuda.memory_allocated() / 2**30, 1)}
    opsets = {"reference": REFERENCE, **({"fused": fused} if fused is not None else {})}
    bf16 = _bound(model, gpu.get("hbm_tb_s"))
    out["bf16"] = {**bf16, "runs": _decode_rows(model, "bf16", opsets, bf16["bound_tok_s"])}
    bnb = packages.get("bitsandbytes", {})
    if not (bnb.get("importable") and str(bnb.get("backend", "")).upper().startswith("CUDA")):
        out["nf4"] = {"skipped": f"bitsandbytes not usable on CUDA here (importable={bnb.get('importable')}, "
                                 f"backend={bnb.get('backend')})"}
        return out
    try:
        quantize_4bit_(model)
        torch.cuda.empty_cache()
        nf4 = _bound(model, gpu.get("hbm_tb_s"))
        out["nf4"] = {**nf4, "runs": _decode_rows(model, "nf4", opsets, nf4["bound_tok_s"])}
    except Exception as e:
        out["nf4"] = {"skipped": f"4-bit decode failed: {type(e).__name__}: {str(e)[:300]}"}
    return out


def run_bench(fused: OpSet | None, packages: dict) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: timings are only taken on a GPU"}
    device = "cuda"
    out = {"ops": bench_ops(fused, device)}
    torch.cuda.empty_cache()
    out["decode_7b"] = bench_decode_7b(fused, device, packages)
    return out
