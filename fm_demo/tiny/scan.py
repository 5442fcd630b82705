"""Training-speed selective scan: same math as `engine.ops.selective_scan_ref`, cheaper on CPU.

Shapes: B batch, T time, D inner channels, N ssm state size.

Why a second scan: the reference materialises exp(delta*A) and delta*B*u as [B, T, D, N] tensors
and keeps autograd's broadcast products of them, so one training step of a tiny model spends most
of its time streaming those big tensors through memory. Here the time loop works on one [B, D, N]
slice at a time (it stays in cache), the discretisation is recomputed in the backward pass instead
of being stored, and every reduction that does not depend on the recurrence (y = C.h, dL/dB, dL/dC,
dL/dA) is done once over all steps with a batched matmul. The recurrence is Mamba-1's
(Gu & Dao 2023, eq. 2a/2b, ZOH for A, Euler for B):

    h_t = exp(dt_t * A) * h_{t-1} + x_t * B_t,   x_t = dt_t * u_t,   y_t = C_t . h_t

Backward (reverse-time adjoint g_t = dL/dh_t):
    g_t = C_t * dL/dy_t + exp(dt_{t+1} A) * g_{t+1}
    dL/dx_t = g_t . B_t;  dL/dB_t = sum_d x_t g_t;  s_t = g_t * h_{t-1} * exp(dt_t A)
    dL/ddt_t = sum_n s_t * A;  dL/dA = sum_{b,t} s_t * dt_t  (s_0 = 0 since h_{-1} = 0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _ScanCore(torch.autograd.Function):
    """y_t = C_t . h_t for the recurrence above, from h0 = 0, in time-major layout.

    dt, x: [T, B, D]; A: [D, N]; Bm, Cm: [T, B, N] (all fp32). Returns y [T, B, D] and the
    final state [B, D, N] (not differentiable: training always starts from a zero state).
    """

    @staticmethod
    def forward(ctx, dt: Tensor, x: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor) -> tuple[Tensor, Tensor]:
        T, Bsz, D = dt.shape
        N = A.shape[1]
        hs = dt.new_empty(T, Bsz, D, N)  # every state h_t, needed by the backward pass
        h = dt.new_zeros(Bsz, D, N)
        for t in range(T):
            dA = torch.exp(dt[t].unsqueeze(-1) * A)  # [B, D, N]
            h = torch.addcmul(dA * h, x[t].unsqueeze(-1), Bm[t].unsqueeze(1), out=hs[t])
        y = torch.matmul(hs, Cm.unsqueeze(-1)).squeeze(-1)  # [T, B, D]
        ctx.save_for_backward(dt, x, A, Bm, Cm, hs)
        h_last = hs[-1].clone()
        ctx.mark_non_differentiable(h_last)
        return y, h_last

    @staticmethod
    def backward(ctx, gy: Tensor, _g_last: Tensor):
        dt, x, A, Bm, Cm, hs = ctx.saved_tensors
        T = dt.shape[0]
        gs = torch.empty_like(hs)  # g_t = dL/dh_t
        gdt = torch.zeros_like(dt)  # [T, B, D]
        gA = torch.zeros_like(hs[0])  # [B, D, N], summed over B at the end
        carry = torch.zeros_like(hs[0])
        # per-step reductions stay inside the loop: the [B, D, N] slices are in cache there, while
        # the same sums over stored [T, B, D, N] tensors would stream them through memory again
        for t in range(T - 1, -1, -1):
            g = torch.addcmul(carry, gy[t].unsqueeze(-1), Cm[t].unsqueeze(1), out=gs[t])
            dA = torch.exp(dt[t].unsqueeze(-1) * A)  # [B, D, N]
            if t > 0:  # h_{-1} = 0 contributes nothing to dt and A
                s = g * hs[t - 1] * dA  # [B, D, N]
                torch.sum(s * A, dim=-1, out=gdt[t])
                gA.addcmul_(s, dt[t].unsqueeze(-1))
            carry = g * dA
        gC = torch.matmul(gy.unsqueeze(-2), hs).squeeze(-2)  # [T, B, N]
        gx = torch.matmul(gs, Bm.unsqueeze(-1)).squeeze(-1)  # [T, B, D]
        gB = torch.matmul(x.unsqueeze(-2), gs).squeeze(-2)  # [T, B, N]
        return gdt, gx, gA.sum(0), gB, gC


def selective_scan_train(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor, h0: Tensor
) -> tuple[Tensor, Tensor]:
    """Drop-in for `selective_scan_ref` (same signature and shapes) when h0 is zero.

    u, delta, z: [B, D, T]; A: [D, N]; B, C: [B, N, T]; D: [D]; h0: [B, D, N] (must be zeros).
    Returns y [B, D, T] in u's dtype and the final state [B, D, N] fp32.
    """
    if bool(h0.any()):
        raise ValueError("selective_scan_train starts from a zero state; use selective_scan_ref otherwise")
    uf = u.float().permute(2, 0, 1)  # [T, B, D]
    dt = delta.float().permute(2, 0, 1).contiguous()  # [T, B, D]
    x = (dt * uf).contiguous()  # [T, B, D]
    Bm = B.float().permute(2, 0, 1).contiguous()  # [T, B, N]
    Cm = C.float().permute(2, 0, 1).contiguous()  # [T, B, N]
    y, h_last = _ScanCore.apply(dt, x, A.float(), Bm, Cm)  # [T, B, D], [B, D, N]
    y = (y + uf * D.float()) * F.silu(z.float().permute(2, 0, 1))
    return y.permute(1, 2, 0).to(u.dtype), h_last


def training_ops():
    """The engine's reference OpSet with this scan swapped in (training only: zero initial state)."""
    from fm_demo.engine.kernels import REFERENCE, OpSet

    paths = {**REFERENCE.paths, "scan": "tiny.scan.selective_scan_train"}
    return OpSet(REFERENCE.conv, REFERENCE.conv_update, selective_scan_train, REFERENCE.state_update,
                 paths, "training: cache-friendly scan with hand-written backward")
