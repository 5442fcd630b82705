"""Pure-torch reference ops of the Falcon Mamba mixer, each with an explicit recurrent state.

Shape glossary (used in every comment below):
    B batch, T time (tokens in a chunk), H hidden size, D intermediate (inner) channels,
    N ssm state size, K conv kernel width, R time-step rank.

The math follows transformers' FalconMambaMixer slow path and state-spaces/mamba's
selective_scan_ref / selective_state_update_ref / causal_conv1d_ref, with one difference that
matters here: every op takes and returns an initial state, so a sequence can be processed in
chunks of any size and give the same result as one pass over the whole sequence.

These functions are the `_ref` twins of the fused CUDA ops in `fused.py` (chosen by `kernels.py`);
they are also differentiable (the scan has a hand-written backward) so the bundled tiny
checkpoints are trained through exactly the code that serves them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _LinearScan(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + b_t over dim 1, with a hand-written backward.

    Autograd through a Python loop records ~T small graphs; this keeps forward and backward to
    one loop of whole-tensor ops each. Backward (reverse-time adjoint of a linear recurrence):
        g_t = dL/dh_t + a_{t+1} * g_{t+1};  dL/db_t = g_t;  dL/da_t = g_t * h_{t-1};  dL/dh0 = a_1 * g_1
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
        # a, b: [B, T, D, N]; h0: [B, D, N] -> h: [B, T, D, N]
        h = torch.empty_like(b)
        prev = h0
        for t in range(a.shape[1]):
            prev = torch.addcmul(b[:, t], a[:, t], prev)
            h[:, t] = prev
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        a, h, h0 = ctx.saved_tensors
        T = a.shape[1]
        grad_b = torch.empty_like(grad_h)
        g = grad_h[:, T - 1].clone()
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                g = torch.addcmul(grad_h[:, t], a[:, t + 1], g)
            grad_b[:, t] = g
        h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)
        grad_a = grad_b * h_prev
        grad_h0 = a[:, 0] * grad_b[:, 0]
        return grad_a, grad_b, grad_h0


def linear_scan(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """All states of h_t = a_t * h_{t-1} + b_t. a, b: [B, T, D, N]; h0: [B, D, N] -> [B, T, D, N]."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or h0.requires_grad):
        return _LinearScan.apply(a, b, h0)
    return _LinearScan.forward(_NoCtx, a, b, h0)


class _NoCtx:
    """Stand-in autograd context for the no-grad path (nothing is saved)."""

    @staticmethod
    def save_for_backward(*_tensors: Tensor) -> None:
        return None


def selective_scan_ref(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor, h0: Tensor
) -> tuple[Tensor, Tensor]:
    """Selective scan from an initial state.

    u, delta, z: [B, D, T] (delta already has dt bias and softplus applied); A: [D, N];
    B, C: [B, N, T]; D: [D]; h0: [B, D, N] fp32. Returns y [B, D, T] in u's dtype and the final
    state [B, D, N] fp32. Mamba-1 recurrence (Gu & Dao 2023, eq. 2a/2b with ZOH for A, Euler for B):
        h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t;   y_t = C_t . h_t + D * u_t
    """
    dt = delta.float().transpose(1, 2)  # [B, T, D]
    uf = u.float().transpose(1, 2)  # [B, T, D]
    Bt = B.float().transpose(1, 2)  # [B, T, N]
    Ct = C.float().transpose(1, 2)  # [B, T, N]
    dA = torch.exp(dt.unsqueeze(-1) * A.float())  # [B, T, D, N]
    dBu = (dt * uf).unsqueeze(-1) * Bt.unsqueeze(2)  # [B, T, D, N]
    h = linear_scan(dA, dBu, h0.float())  # [B, T, D, N]
    y = torch.einsum("btdn,btn->btd", h, Ct)  # [B, T, D]
    y = (y + uf * D.float()) * F.silu(z.float().transpose(1, 2))
    return y.transpose(1, 2).to(u.dtype), h[:, -1]


def selective_state_update_ref(
    h: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor
) -> Tensor:
    """One recurrent step; h [B, D, N] fp32 is advanced in place.

    u, delta, z: [B, D] (delta with bias and softplus applied); A: [D, N]; B, C: [B, N]; D: [D].
    Returns y [B, D] in u's dtype.
    """
    dt = delta.float()
    dA = torch.exp(dt.unsqueeze(-1) * A.float())  # [B, D, N]
    dBu = (dt * u.float()).unsqueeze(-1) * B.float().unsqueeze(1)  # [B, D, N]
    h.mul_(dA).add_(dBu)
    y = torch.einsum("bdn,bn->bd", h, C.float()) + u.float() * D.float()  # [B, D]
    return (y * F.silu(z.float())).to(u.dtype)


def causal_conv1d_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor
) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv + SiLU from an initial state.

    x: [B, D, T]; weight: [D, K]; bias: [D] or None; initial_state: [B, D, K-1] (the K-1 inputs
    before x). Returns y [B, D, T] in x's dtype and the final state [B, D, K-1].
    """
    K = weight.shape[-1]
    xs = torch.cat([initial_state.to(weight.dtype), x.to(weight.dtype)], dim=-1)  # [B, D, K-1+T]
    y = F.conv1d(xs, weight.unsqueeze(1), bias, groups=weight.shape[0])  # [B, D, T]
    return F.silu(y).to(x.dtype), xs[..., xs.shape[-1] - (K - 1) :].to(initial_state.dtype)


def causal_conv1d_update_ref(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One conv step; conv_state [B, D, K-1] is shifted in place. x: [B, D] -> y [B, D] (SiLU applied)."""
    window = torch.cat([conv_state, x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)  # [B, D, K]
    y = torch.einsum("bdk,dk->bd", window.to(weight.dtype), weight)
    if bias is not None:
        y = y + bias
    conv_state.copy_(window[..., 1:])
    return F.silu(y).to(x.dtype)


def rms_norm_ref(x: Tensor, eps: float) -> Tensor:
    """Weightless RMS norm of FalconMamba's dt, B and C (computed in fp32, returned in x's dtype)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
