"""Fused CUDA twins of the reference ops (causal-conv1d, mamba-ssm), loaded only where they import.

Every wrapper keeps the signature of its `_ref` twin in ops.py (same shapes, dtypes, in-place
contract), so the mixer never knows which one runs. Shapes as in ops.py: B batch, T time, D inner
channels, N ssm state size, K conv width.

Deviations from calling the libraries directly, and why:
- mamba-ssm's selective_scan_fn has no initial state. The recurrence is linear in h, so a scan
  from h0 is the scan from zero plus h0's decayed contribution; `scan_h0_correction` adds that
  exactly (pure torch, fp32, chunk-wise in time so memory stays bounded).
- The scan kernel wants delta in u's dtype; the mixer makes delta in fp32. The wrapper runs the
  kernel on fp32 copies of u, delta, B, C, z, which is what the reference computes in anyway.
- causal-conv1d takes initial/final conv states only in channel-last layout (x.stride(1) == 1);
  the wrappers hand it views in that layout.
"""

from __future__ import annotations

import functools
import inspect
from importlib import metadata
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .opset import OP_NAMES, REFERENCE, OpSet


def scan_h0_correction(delta: Tensor, A: Tensor, C: Tensor, z: Tensor, h0: Tensor,
                       piece: int = 64) -> tuple[Tensor, Tensor]:
    """What a nonzero initial state h0 adds to a selective scan's output and final state.

    delta, z: [B, D, T] (delta after bias and softplus); A: [D, N]; C: [B, N, T]; h0: [B, D, N].
    With S_t = sum_{s<=t} delta_s, unrolling h_t = exp(delta_t A) h_{t-1} + ... gives
        y_t += silu(z_t) * sum_n C_t[n] exp(A[:, n] S_t) h0[:, n]      h_T += exp(A S_T) h0
    Returns (y_corr [B, D, T], h_corr [B, D, N]) in fp32, or fp64 when h0 is fp64.
    `piece` bounds the [B, D, piece, N] temporary.
    """
    dt = torch.promote_types(h0.dtype, torch.float32)
    S = torch.cumsum(delta.to(dt), dim=-1)  # [B, D, T]
    Af, h0f, Cf = A.to(dt), h0.to(dt), C.to(dt)
    pieces = []
    for t0 in range(0, S.shape[-1], piece):
        decay = torch.exp(S[..., t0:t0 + piece].unsqueeze(-1) * Af[:, None, :])  # [B, D, t, N]
        pieces.append(torch.einsum("bdtn,bnt->bdt", decay * h0f.unsqueeze(2), Cf[..., t0:t0 + piece]))
    y_corr = torch.cat(pieces, dim=-1) * F.silu(z.to(dt))  # [B, D, T]
    h_corr = torch.exp(S[..., -1:] * Af) * h0f  # [B, D, 1] * [D, N] -> [B, D, N]
    return y_corr, h_corr


def selective_scan_fused(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                         z: Tensor, h0: Tensor, *, kernel: Callable) -> tuple[Tensor, Tensor]:
    """selective_scan_ref's twin: the zero-state kernel scan plus the exact h0 correction.

    `kernel` has selective_scan_fn's signature (u, delta, A, B, C, D, z, delta_bias,
    delta_softplus, return_last_state) and scans from a zero state.
    """
    f = torch.float32
    y0, h_last = kernel(u.to(f), delta.to(f), A.to(f), B.to(f), C.to(f), D.to(f), z.to(f),
                        delta_bias=None, delta_softplus=False, return_last_state=True)
    y_corr, h_corr = scan_h0_correction(delta, A, C, z, h0)
    return (y0.float() + y_corr).to(u.dtype), (h_last.float() + h_corr).to(h0.dtype)


@functools.lru_cache(maxsize=16)
def _zero_bias(n: int, device: torch.device) -> Tensor:
    """A constant zero dt bias: delta arrives with bias and softplus applied, and the kernel
    needs a dt_bias tensor (mamba-ssm 2.x indexes its strides unconditionally)."""
    return torch.zeros(n, device=device, dtype=torch.float32)


def selective_state_update_fused(h: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                 D: Tensor, z: Tensor, *, kernel: Callable) -> Tensor:
    """selective_state_update_ref's twin; h [B, D, N] fp32 is advanced in place by the kernel."""
    return kernel(h, u, delta, A, B, C, D=D.float(), z=z, dt_bias=_zero_bias(D.shape[0], D.device),
                  dt_softplus=False)


def _channel_last(t: Tensor) -> Tensor:
    """The same [B, D, L] values with stride(1) == 1 (causal-conv1d's layout for conv states)."""
    if t.stride(1) == 1 and t.stride(2) > 1:
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def causal_conv1d_fused(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor, *,
                        kernel: Callable) -> tuple[Tensor, Tensor]:
    """causal_conv1d_ref's twin. x [B, D, T], initial_state [B, D, K-1] -> (y, final state)."""
    init = _channel_last(initial_state.to(x.dtype))
    y, final = kernel(_channel_last(x), weight, bias, initial_states=init, return_final_states=True,
                      activation="silu")
    return y, final.to(initial_state.dtype)


def causal_conv1d_update_fused(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, *,
                               kernel: Callable, full_width_state: bool = False) -> Tensor:
    """causal_conv1d_update_ref's twin; conv_state [B, D, K-1] is shifted in place.

    causal-conv1d before 1.4 wants a state of width K (it shifts first, then convolves the whole
    window); `full_width_state` pads one leading column that the shift drops again.
    """
    xs = x.to(conv_state.dtype)
    if not full_width_state:
        return kernel(xs, conv_state, weight, bias, activation="silu").to(x.dtype)
    window = F.pad(conv_state, (1, 0))  # [B, D, K]
    y = kernel(xs, window, weight, bias, activation="silu")
    conv_state.copy_(window[..., 1:])
    return y.to(x.dtype)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _conv_ops() -> tuple[dict[str, Callable], dict[str, str], str]:
    """(fused conv ops, their paths, why any conv op stays reference)."""
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception as e:  # ImportError, or OSError/RuntimeError from a broken CUDA build
        return {}, {}, f"causal-conv1d not importable ({type(e).__name__}: {e})"
    lib = f"causal-conv1d {_version('causal-conv1d')}"
    fns, paths, why = {}, {}, ""
    if {"initial_states", "return_final_states"} <= set(inspect.signature(causal_conv1d_fn).parameters):
        fns["conv"] = functools.partial(causal_conv1d_fused, kernel=causal_conv1d_fn)
        paths["conv"] = f"fused: {lib} causal_conv1d_fn"
    else:
        why = f"{lib} has no initial_states in causal_conv1d_fn (needs >= 1.2)"
    # 1.4 added conv states longer than K-1 together with cache_seqlens; older ones want width K
    full_width = "cache_seqlens" not in inspect.signature(causal_conv1d_update).parameters
    fns["conv_update"] = functools.partial(causal_conv1d_update_fused, kernel=causal_conv1d_update,
                                           full_width_state=full_width)
    paths["conv_update"] = f"fused: {lib} causal_conv1d_update" + (" (width-K state)" if full_width else "")
    return fns, paths, why


def _ssm_ops() -> tuple[dict[str, Callable], dict[str, str], str]:
    """(fused ssm ops, their paths, why they stay reference)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception as e:  # needs the compiled selective_scan_cuda extension and Triton
        return {}, {}, f"mamba-ssm not importable ({type(e).__name__}: {e})"
    lib = f"mamba-ssm {_version('mamba-ssm')}"
    fns = {"scan": functools.partial(selective_scan_fused, kernel=selective_scan_fn),
           "state_update": functools.partial(selective_state_update_fused, kernel=selective_state_update)}
    paths = {"scan": f"fused: {lib} selective_scan_fn + exact h0 correction",
             "state_update": f"fused: {lib} triton selective_state_update"}
    return fns, paths, ""


def load() -> tuple[OpSet | None, str]:
    """(op set with every importable fused op, why any op stays reference) or (None, why none does).

    Ops whose library is missing keep their reference twin; `OpSet.paths` names each op's choice.
    """
    conv_fns, conv_paths, conv_why = _conv_ops()
    ssm_fns, ssm_paths, ssm_why = _ssm_ops()
    fns, paths = {**conv_fns, **ssm_fns}, {**conv_paths, **ssm_paths}
    why = "; ".join(w for w in (conv_why, ssm_why) if w)
    if not fns:
        return None, f"no fused kernels: {why}"
    chosen = {name: fns.get(name, REFERENCE.op(name)) for name in OP_NAMES}
    all_paths = {name: paths.get(name, "reference") for name in OP_NAMES}
    reason = "fused kernels" + (f" where available; reference for the rest: {why}" if why else "")
    return OpSet(**chosen, paths=all_paths, reason=reason), ""
