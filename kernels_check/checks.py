"""Op-level checks: each fused op against its `_ref` twin, and the `_ref` ops against transformers.

Shapes: B batch, D inner channels, T time, N ssm state, K conv width. Each check runs an op on
random inputs laid out as the mixer lays them out (x as a channel-last view of in_proj's output,
fp32 delta and ssm state, nonzero initial states) and compares every output, states included.

Error metrics (per check, worst over the op's outputs):
    max_abs = max |got - want|        max_rel = max_abs / max |want|
    ok  <=>  max_abs <= atol + rtol * max |want|
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fm_demo.engine.opset import OP_NAMES, REFERENCE, OpSet

# (atol, rtol) per dtype; bf16 outputs are rounded to bf16 (eps 2^-8) on both sides
OP_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-2, 1e-2)}

CHUNK_SHAPES = ({"B": 1, "D": 256, "T": 1, "N": 16, "K": 4}, {"B": 2, "D": 512, "T": 37, "N": 16, "K": 4},
                {"B": 1, "D": 8192, "T": 256, "N": 16, "K": 4}, {"B": 2, "D": 1024, "T": 300, "N": 16, "K": 3})
STEP_SHAPES = ({"B": 1, "D": 8192, "N": 16, "K": 4}, {"B": 3, "D": 512, "N": 16, "K": 4},
               {"B": 1, "D": 256, "N": 16, "K": 2})
REF_SHAPES = ({"B": 2, "D": 64, "T": 9, "N": 16, "K": 4}, {"B": 1, "D": 128, "T": 33, "N": 8, "K": 4})

REF_OPS = {name: REFERENCE.op(name) for name in OP_NAMES}  # each fused op's `_ref` twin

Case = Callable[[Callable], dict[str, Tensor | None]]  # runs an op implementation -> its outputs


def compare(got: dict[str, Tensor | None], want: dict[str, Tensor | None], atol: float,
            rtol: float) -> dict:
    """Worst error over the outputs both sides produce (None = not produced by one side)."""
    worst = {"max_abs": 0.0, "max_rel": 0.0, "ok": True, "worst_output": None}
    for name, w in want.items():
        g = got.get(name)
        if g is None or w is None:
            continue
        if g.shape != w.shape:
            return {"max_abs": float("inf"), "max_rel": float("inf"), "ok": False,
                    "worst_output": f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"}
        err = float((g.double() - w.double()).abs().max())
        scale = float(w.double().abs().max())
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        ok = err <= atol + rtol * scale and bool(torch.isfinite(g).all())
        if rel >= worst["max_rel"] or not ok:
            worst.update(max_abs=err, max_rel=rel, worst_output=name)
        worst["ok"] = worst["ok"] and ok
    return worst


def _rand(gen: torch.Generator, *shape: int, scale: float = 1.0, device: str = "cpu") -> Tensor:
    return torch.randn(*shape, generator=gen, device=device) * scale


def conv_case(s: dict, dtype: torch.dtype, device: str, gen: torch.Generator, zero_state: bool = False) -> Case:
    B, D, T, K = s["B"], s["D"], s["T"], s["K"]
    x = _rand(gen, B, T, 2 * D, device=device).to(dtype).transpose(1, 2)[:, :D]  # [B, D, T] channel-last
    w, b = _rand(gen, D, K, scale=0.5, device=device).to(dtype), _rand(gen, D, scale=0.1, device=device).to(dtype)
    init = torch.zeros(B, D, K - 1, device=device, dtype=dtype) if zero_state else _rand(
        gen, B, D, K - 1, device=device).to(dtype)

    def run(fn: Callable) -> dict[str, Tensor | None]:
        y, final = fn(x, w, b, init.clone())
        return {"y": y, "state": final}
    return run


def conv_update_case(s: dict, dtype: torch.dtype, device: str, gen: torch.Generator, **_: bool) -> Case:
    B, D, K = s["B"], s["D"], s["K"]
    x = _rand(gen, B, 2 * D, device=device).to(dtype)[:, :D]  # [B, D]
    w, b = _rand(gen, D, K, scale=0.5, device=device).to(dtype), _rand(gen, D, scale=0.1, device=device).to(dtype)
    state = _rand(gen, B, D, K - 1, device=device).to(dtype)

    def run(fn: Callable) -> dict[str, Tensor | None]:
        st = state.clone()
        return {"y": fn(x, st, w, b), "state": st}
    return run


def _ssm_params(s: dict, dtype: torch.dtype, device: str, gen: torch.Generator, time: tuple[int, ...]):
    B, D, N = s["B"], s["D"], s["N"]
    u = _rand(gen, B, D, *time, device=device).to(dtype)
    delta = F.softplus(_rand(gen, B, D, *time, device=device) - 2.0)  # fp32, as the mixer makes it
    A = -torch.exp(_rand(gen, D, N, scale=0.5, device=device))  # [D, N] fp32
    Bm, Cm = (_rand(gen, B, N, *time, device=device).to(dtype) for _ in range(2))
    Dv = _rand(gen, D, device=device)
    z = _rand(gen, B, D, *time, device=device).to(dtype)
    return u, delta, A, Bm, Cm, Dv, z


def scan_case(s: dict, dtype: torch.dtype, device: str, gen: torch.Generator, zero_state: bool = False) -> Case:
    u, delta, A, Bm, Cm, Dv, z = _ssm_params(s, dtype, device, gen, (s["T"],))
    h0 = torch.zeros(s["B"], s["D"], s["N"], device=device) if zero_state else _rand(
        gen, s["B"], s["D"], s["N"], device=device)

    def run(fn: Callable) -> dict[str, Tensor | None]:
        y, h = fn(u, delta, A, Bm, Cm, Dv, z, h0.clone())
        return {"y": y, "state": h}
    return run


def state_update_case(s: dict, dtype: torch.dtype, device: str, gen: torch.Generator, **_: bool) -> Case:
    u, delta, A, Bm, Cm, Dv, z = _ssm_params(s, dtype, device, gen, ())
    h0 = _rand(gen, s["B"], s["D"], s["N"], device=device)

    def run(fn: Callable) -> dict[str, Tensor | None]:
        h = h0.clone()
        return {"y": fn(h, u, delta, A, Bm, Cm, Dv, z), "state": h}
    return run


CASES = {"conv": (conv_case, CHUNK_SHAPES), "conv_update": (conv_update_case, STEP_SHAPES),
         "scan": (scan_case, CHUNK_SHAPES), "state_update": (state_update_case, STEP_SHAPES)}


def entry(op: str, impl: str, against: str, shape: dict | None, dtype: torch.dtype | None,
          result: dict | None = None, tol: tuple[float, float] | None = None, reason: str = "") -> dict:
    """One row of the report's "checks" list; status is ok | fail | skipped."""
    row = {"op": op, "impl": impl, "against": against, "shape": shape,
           "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
           "max_abs": None, "max_rel": None, "atol": None, "rtol": None, "status": "skipped", "reason": reason}
    if result is not None:
        row.update(max_abs=result["max_abs"], max_rel=result["max_rel"], atol=tol[0], rtol=tol[1],
                   status="ok" if result["ok"] else "fail",
                   reason=reason or ("" if result["ok"] else f"worst output: {result['worst_output']}"))
    return row


def _run_case(op: str, impl: str, against: str, fn: Callable, ref: Callable, shape: dict,
              dtype: torch.dtype, device: str, zero_state: bool = False) -> dict:
    make, _ = CASES[op]
    gen = torch.Generator(device=device).manual_seed(1234)
    tol = OP_TOL[dtype]
    try:
        case = make(shape, dtype, device, gen, zero_state=zero_state)
        return entry(op, impl, against, shape, dtype, compare(case(fn), case(ref), *tol), tol)
    except Exception as e:  # a kernel that raises on a supported shape fails its check
        return {**entry(op, impl, against, shape, dtype), "status": "fail",
                "reason": f"raised {type(e).__name__}: {str(e)[:300]}"}


def fused_op_checks(opset: OpSet | None, device: str, why_not: str = "",
                    dtypes=(torch.float32, torch.bfloat16), shapes: dict | None = None) -> list[dict]:
    """Every fused op of `opset` against its `_ref` twin over CHUNK_SHAPES/STEP_SHAPES (or `shapes`
    per op) x dtypes. Ops without a fused kernel (all of them when opset is None) get one skipped
    row saying why."""
    rows = []
    for op in OP_NAMES:
        impl = opset.paths.get(op, "reference") if opset is not None else "reference"
        if impl == "reference":
            why = why_not or (opset.reason if opset is not None else "") or "no fused kernel for this op"
            rows.append(entry(op, "fused", "reference", None, None, reason=why))
            continue
        for shape in (shapes or {}).get(op, CASES[op][1]):
            for dtype in dtypes:
                rows.append(_run_case(op, impl, "reference", getattr(opset, op), REF_OPS[op], shape, dtype, device))
    return rows


def transformers_slow_path() -> dict[str, Callable] | None:
    """transformers' FalconMamba torch-only functions, adapted to the ops.py signatures.

    They have no initial states (scan and conv start from zero), so cases run with zero states;
    transformers' conv returns no final state, so only y is compared for it.
    """
    try:
        from transformers.models.falcon_mamba import modeling_falcon_mamba as m

        fns = {n: getattr(getattr(m, n), "__wrapped__", getattr(m, n)) for n in (
            "mamba_selective_scan", "mamba_selective_state_update", "causal_conv1d_fn", "causal_conv1d_update")}
    except (ImportError, AttributeError):
        return None

    def conv(x, w, b, init):
        return fns["causal_conv1d_fn"](x, w, b, activation="silu"), None

    def conv_update(x, state, w, b):
        return fns["causal_conv1d_update"](x.unsqueeze(-1), state, w, b, activation="silu").squeeze(-1)

    def scan(u, delta, A, Bm, Cm, Dv, z, h0):
        return fns["mamba_selective_scan"](u, delta, A, Bm, Cm, Dv, z, return_last_state=True)

    def state_update(h, u, delta, A, Bm, Cm, Dv, z):
        return fns["mamba_selective_state_update"](h, u, delta, A, Bm, Cm, D=Dv, z=z)

    return {"conv": conv, "conv_update": conv_update, "scan": scan, "state_update": state_update}


def reference_checks(device: str = "cpu") -> list[dict]:
    """The `_ref` ops against transformers' slow path (fp32, zero initial states)."""
    slow = transformers_slow_path()
    if slow is None:
        return [entry(op, "reference", "transformers slow path", None, None,
                      reason="this transformers version has no module-level FalconMamba slow-path functions")
                for op in OP_NAMES]
    return [_run_case(op, "reference", "transformers slow path", REF_OPS[op], slow[op], shape, torch.float32,
                      device, zero_state=True)
            for op in OP_NAMES for shape in REF_SHAPES]
