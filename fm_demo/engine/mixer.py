"""Stateful Falcon Mamba forward over a transformers model's own modules and weights.

Shapes: B batch, T tokens, H hidden, D inner channels, N ssm state, K conv width, R dt rank, V vocab.

The model's Linear modules are called as modules, so bitsandbytes 4-bit layers just work; the
mixer math between them (conv, dt/B/C norms, selective scan) goes through an `OpSet`, whose ops
are the pure-torch references or their fused CUDA twins. The arithmetic mirrors
transformers' FalconMambaMixer/FalconMambaBlock (residual in fp32, norm_f, lm_head in its dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import OpSet
from .ops import rms_norm_ref
from .state import zero_state


@dataclass
class LayerConsts:
    """Per-layer tensors derived once from the weights (not per token)."""

    A: Tensor  # [D, N] fp32, = -exp(A_log)
    conv_w: Tensor  # [D, K]
    conv_b: Tensor | None  # [D]
    D: Tensor  # [D] fp32
    dt_w: Tensor | None  # [D, R] plain weight, None when dt_proj is quantized
    dt_b: Tensor  # [D] fp32
    eps: float


def layer_consts(mixer: nn.Module, detach: bool = True) -> LayerConsts:
    """The layer's derived tensors; detach=False keeps them in the graph (training)."""
    d = (lambda t: t.detach()) if detach else (lambda t: t)
    dt, conv = mixer.dt_proj, mixer.conv1d
    plain = dt.weight.dtype.is_floating_point and type(dt) is nn.Linear
    return LayerConsts(
        A=-torch.exp(d(mixer.A_log).float()),
        conv_w=d(conv.weight)[:, 0, :],
        conv_b=d(conv.bias) if conv.bias is not None else None,
        D=d(mixer.D).float(),
        dt_w=d(dt.weight) if plain else None,
        dt_b=d(dt.bias).float(),
        eps=mixer.rms_eps,
    )


def _delta(mixer: nn.Module, c: LayerConsts, ts: Tensor) -> Tensor:
    """softplus(dt_proj(rms(ts))) in fp32; ts [..., R] -> [..., D].

    The bias is added in fp32 as in the fused kernels (delta_bias); a quantized dt_proj is called
    as a module and its bias taken out again, as transformers does.
    """
    ts = rms_norm_ref(ts, c.eps)
    if c.dt_w is not None:
        dt = F.linear(ts, c.dt_w).float()
    else:
        dt = mixer.dt_proj(ts.contiguous()).float() - c.dt_b
    return F.softplus(dt + c.dt_b)


def _ssm_inputs(mixer: nn.Module, c: LayerConsts, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x_proj -> (delta [..., D] fp32, B [..., N], C [..., N]) with FalconMamba's weightless norms."""
    R, N = mixer.time_step_rank, mixer.ssm_state_size
    ts, Bm, Cm = torch.split(mixer.x_proj(u), [R, N, N], dim=-1)
    return _delta(mixer, c, ts), rms_norm_ref(Bm, c.eps), rms_norm_ref(Cm, c.eps)


def mixer_chunk(mixer: nn.Module, c: LayerConsts, ops: OpSet, x: Tensor, conv_state: Tensor,
                ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, T, H] from (conv_state [B, D, K-1], ssm_state [B, D, N]) -> (y [B, T, H], conv', ssm')."""
    u, z = mixer.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # [B, D, T] each
    u, conv_state = ops.conv(u, c.conv_w, c.conv_b, conv_state)  # [B, D, T]
    # contiguous: bitsandbytes' CPU 4-bit matmul returns wrong values for strided inputs
    delta, Bm, Cm = _ssm_inputs(mixer, c, u.transpose(1, 2).contiguous())  # [B, T, D], [B, T, N] x2
    y, ssm_state = ops.scan(u, delta.transpose(1, 2), c.A, Bm.transpose(1, 2), Cm.transpose(1, 2),
                            c.D, z, ssm_state)  # [B, D, T]
    return mixer.out_proj(y.transpose(1, 2).to(x.dtype).contiguous()), conv_state, ssm_state


def mixer_step(mixer: nn.Module, c: LayerConsts, ops: OpSet, x: Tensor, conv_state: Tensor,
               ssm_state: Tensor) -> Tensor:
    """One token: x [B, H] -> y [B, H]; conv_state and ssm_state are advanced in place."""
    u, z = mixer.in_proj(x).chunk(2, dim=-1)  # [B, D] each
    u = ops.conv_update(u, conv_state, c.conv_w, c.conv_b).contiguous()  # [B, D]; see mixer_chunk
    delta, Bm, Cm = _ssm_inputs(mixer, c, u)  # [B, D], [B, N], [B, N]
    y = ops.state_update(ssm_state, u, delta, c.A, Bm, Cm, c.D, z)  # [B, D]
    return mixer.out_proj(y.to(x.dtype))


def _block_pre(block: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor]:
    residual = hidden.float() if block.residual_in_fp32 else hidden
    return block.norm(hidden.to(block.norm.weight.dtype)), residual


def head(model: nn.Module, hidden: Tensor) -> Tensor:
    """norm_f + lm_head, logits in fp32 as transformers returns them."""
    hidden = model.backbone.norm_f(hidden)
    return model.lm_head(hidden.to(model.lm_head.weight.dtype)).float()


def forward_chunk(model: nn.Module, consts: list[LayerConsts], ops: OpSet, input_ids: Tensor,
                  conv: Tensor, ssm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """input_ids [B, T] from states conv [L, B, D, K-1], ssm [L, B, D, N].

    Returns (final hidden [B, T, H], conv', ssm') without touching the inputs, so it is
    differentiable and usable for training as well as serving.
    """
    hidden = model.backbone.embeddings(input_ids)  # [B, T, H]
    convs, ssms = [], []
    for i, block in enumerate(model.backbone.layers):
        x, residual = _block_pre(block, hidden)
        y, cs, ss = mixer_chunk(block.mixer, consts[i], ops, x, conv[i], ssm[i])
        hidden = residual + y
        convs.append(cs)
        ssms.append(ss)
    return hidden, torch.stack(convs), torch.stack(ssms)


def forward_step(model: nn.Module, consts: list[LayerConsts], ops: OpSet, token_ids: Tensor,
                 conv: Tensor, ssm: Tensor) -> Tensor:
    """token_ids [B] -> logits [B, V]; conv and ssm states are advanced in place."""
    hidden = model.backbone.embeddings(token_ids)  # [B, H]
    for i, block in enumerate(model.backbone.layers):
        x, residual = _block_pre(block, hidden)
        hidden = residual + mixer_step(block.mixer, consts[i], ops, x, conv[i], ssm[i])
    return head(model, hidden)


def model_forward(model: nn.Module, input_ids: Tensor, ops: OpSet | None = None) -> Tensor:
    """Logits [B, T, V] of input_ids [B, T] from a zero state (training entry point).

    Differentiable when grad is enabled: then gradients flow into A_log, D, conv and dt bias too.
    """
    from .kernels import REFERENCE

    ops = ops or REFERENCE
    consts = [layer_consts(b.mixer, detach=not torch.is_grad_enabled()) for b in model.backbone.layers]
    cfg = model.config
    conv, ssm = zero_state(cfg, input_ids.shape[0], model.backbone.embeddings.weight.dtype, input_ids.device)
    hidden, _, _ = forward_chunk(model, consts, ops, input_ids, conv, ssm)
    return head(model, hidden)
