"""Whole-model checks: engine logits through the fused path vs the reference path.

A random Falcon Mamba is read by the engine in several chunkings and then decoded for a few steps;
every run is compared with the reference path reading the whole prompt in one chunk. The
reference path itself is compared with transformers' own forward pass (fp32), so the chain
fused -> reference -> transformers is closed. CUDA graphs are off here (they are checked in
`graph_check`), so these numbers are about the ops alone.
"""

from __future__ import annotations

import torch

from fm_demo.engine import REFERENCE, Engine, OpSet
from fm_demo.engine.cuda_graph import EXACT_RTOL
from fm_demo.engine.mixer import forward_step

from .checks import compare, entry
from .models import build_random_model

MODEL_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 5e-2)}  # (atol, rtol) on logits
CHUNKINGS = (1, 7, 16)
PROMPT_T, DECODE_STEPS, BATCH = 40, 4, 2
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "state_size": 16, "expand": 2, "conv_kernel": 4,
        "time_step_rank": 64, "vocab_size": 512}


def tiny_random(device: str, dtype: torch.dtype, **overrides):
    from fm_demo.engine import tiny_config

    return build_random_model(tiny_config(**{**TINY, **overrides}), device, dtype, seed=7)


def _eager_engine(model, chunk: int, ops: OpSet) -> Engine:
    return Engine(model, chunk_size=chunk, ops=ops, cuda_graphs=False)  # the ops alone; graphs checked apart


def _run(engine: Engine, ids: torch.Tensor, steps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of every prompt position, then of DECODE_STEPS teacher-forced steps."""
    state = engine.new_state(ids.shape[0])
    prefill = engine.prefill(ids, state, all_logits=True)  # [B, T, V]
    decoded = torch.stack([engine.step(steps[:, i], state) for i in range(steps.shape[1])], 1)  # [B, S, V]
    return {"prefill": prefill, "steps": decoded, "ssm_state": state.ssm}


def _row(path: str, against: str, dtype: torch.dtype, chunk: int | None, got: dict, want: dict) -> dict:
    tol = MODEL_TOL[dtype]
    return entry("model", path, against, {"chunk": chunk, "T": PROMPT_T, "B": BATCH, "steps": DECODE_STEPS},
                 dtype, compare(got, want, *tol), tol)


def model_check(device: str, fused: OpSet | None, why_not: str,
                dtypes=(torch.float32, torch.bfloat16)) -> dict:
    """{"config", "results": [rows], "status"}; fused rows are skipped with `why_not` when fused is None."""
    rows = []
    for dtype in dtypes:
        model = tiny_random(device, dtype)
        gen = torch.Generator(device="cpu").manual_seed(3)
        ids = torch.randint(0, TINY["vocab_size"], (BATCH, PROMPT_T), generator=gen).to(device)
        steps = torch.randint(0, TINY["vocab_size"], (BATCH, DECODE_STEPS), generator=gen).to(device)
        want = _run(_eager_engine(model, PROMPT_T, REFERENCE), ids, steps)
        if dtype == torch.float32:
            with torch.no_grad():
                hf = model(ids).logits.float()
            rows.append(_row("reference", "transformers forward", dtype, PROMPT_T, {"prefill": want["prefill"]},
                             {"prefill": hf}))
        for chunk in CHUNKINGS:
            rows.append(_row("reference", "reference, one chunk", dtype, chunk,
                             _run(_eager_engine(model, chunk, REFERENCE), ids, steps), want))
        if fused is None:
            rows.append(entry("model", "fused", "reference, one chunk", None, dtype, reason=why_not))
            continue
        for chunk in (*CHUNKINGS, PROMPT_T):
            rows.append(_row("fused", "reference, one chunk", dtype, chunk,
                             _run(_eager_engine(model, chunk, fused), ids, steps), want))
        del model
    status = "fail" if any(r["status"] == "fail" for r in rows) else "ok"
    return {"config": TINY, "results": rows, "status": status}


def decode_step_checks(device: str, fused: OpSet | None, why_not: str,
                       dtypes=(torch.float32, torch.bfloat16)) -> list[dict]:
    """The whole decode step (forward_step over all layers) fused vs reference, from a random state;
    on a tiny model and on a 2-layer model of the 7B's width."""
    if fused is None:
        return [entry("decode_step", "fused", "reference", None, None, reason=why_not)]
    shapes = {"tiny": {}, "7B-width, 2 layers": {"hidden_size": 4096, "expand": 2, "time_step_rank": 256}}
    rows = []
    for label, overrides in shapes.items():
        for dtype in dtypes:
            model = tiny_random(device, dtype, **overrides)
            engine = _eager_engine(model, 16, fused)
            state = engine.new_state(BATCH)
            gen = torch.Generator(device="cpu").manual_seed(5)
            state.ssm.copy_(torch.randn(state.ssm.shape, generator=gen))
            state.conv.copy_(torch.randn(state.conv.shape, generator=gen))
            ids = torch.randint(0, TINY["vocab_size"], (BATCH,), generator=gen).to(device)
            outs = {}
            for name, ops in (("fused", fused), ("reference", REFERENCE)):
                s = state.clone()
                with torch.inference_mode():
                    logits = forward_step(model, engine.consts, ops, ids, s.conv, s.ssm)
                outs[name] = {"logits": logits, "conv_state": s.conv, "ssm_state": s.ssm}
            tol = MODEL_TOL[dtype]
            rows.append(entry("decode_step", "fused", "reference", {"model": label, "B": BATCH}, dtype,
                              compare(outs["fused"], outs["reference"], *tol), tol))
            del model, engine
    return rows


def graph_check(device: str, dtypes=(torch.float32, torch.bfloat16)) -> list[dict]:
    """Engine.step through its CUDA graph vs eager, over a few steps, with the engine's own ops."""
    if not str(device).startswith("cuda"):
        return [entry("decode_step", "cuda_graph", "eager step", None, None,
                      reason="no CUDA device: CUDA graphs are not used")]
    rows = []
    for dtype in dtypes:
        model = tiny_random(device, dtype)
        graphed = Engine(model)
        if graphed.graphs is None:
            return [entry("decode_step", "cuda_graph", "eager step", None, None,
                          reason="CUDA graphs turned off (FM_DEMO_CUDA_GRAPHS=0)")]
        eager = _eager_engine(model, graphed.chunk_size, graphed.ops)
        gen = torch.Generator(device="cpu").manual_seed(11)
        ids = torch.randint(0, TINY["vocab_size"], (1, 24), generator=gen).to(device)
        steps = torch.randint(0, TINY["vocab_size"], (1, 8), generator=gen).to(device)
        got, want = _run(graphed, ids, steps), _run(eager, ids, steps)
        tol = (EXACT_RTOL, EXACT_RTOL)  # what the engine itself accepts
        row = entry("decode_step", "cuda_graph", "eager step", {"B": 1, "steps": 8}, dtype,
                    compare(got, want, *tol), tol)
        if not graphed.graphs.captured(1):  # it fell back to eager: nothing was compared
            row.update(status="skipped", max_abs=None, max_rel=None)
        row["reason"] = row["reason"] or graphed.kernel_report()["decode_graph"]
        rows.append(row)
    return rows
