"""Fused-kernel wrappers, the h0 correction, the `_ref` ops vs transformers, and CUDA graphs.

CPU tests check everything that is math (the initial-state correction, each wrapper's
composition with an independent zero-state implementation, the `_ref` ops against transformers'
slow path). The kernels themselves and CUDA graphs are tested only where CUDA runs them; without
CUDA those tests are skipped, never faked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fm_demo.engine import REFERENCE, Engine, fused, ops, select_ops
from fm_demo.engine.cuda_graph import DecodeGraphs
from kernels_check.model_check import tiny_random

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (fused kernels and CUDA graphs)")


def _slow(name: str):
    """transformers' torch-only FalconMamba function (the undecorated one, never a hub kernel)."""
    from transformers.models.falcon_mamba import modeling_falcon_mamba as m

    fn = getattr(m, name)
    return getattr(fn, "__wrapped__", fn)


def _ssm_inputs(B=2, D=24, T=19, N=8, dtype=torch.float32, seed=0, time=True):
    g = torch.Generator().manual_seed(seed)
    shape = (B, D, T) if time else (B, D)
    u = torch.randn(*shape, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(*shape, generator=g, dtype=dtype) - 1.5)
    A = -torch.exp(0.5 * torch.randn(D, N, generator=g, dtype=dtype))
    bc_shape = (B, N, T) if time else (B, N)
    Bm = torch.randn(*bc_shape, generator=g, dtype=dtype)
    Cm = torch.randn(*bc_shape, generator=g, dtype=dtype)
    Dv = torch.randn(D, generator=g, dtype=dtype)
    z = torch.randn(*shape, generator=g, dtype=dtype)
    h0 = torch.randn(B, D, N, generator=g, dtype=dtype)
    return u, delta, A, Bm, Cm, Dv, z, h0


def _loop_scan(u, delta, A, Bm, Cm, Dv, z, h0):
    """Plain sequential Mamba-1 recurrence in the inputs' dtype (fp64 here): the ground truth."""
    h, ys = h0.clone(), []
    for t in range(u.shape[-1]):
        dt = delta[..., t]  # [B, D]
        h = torch.exp(dt[..., None] * A) * h + (dt * u[..., t])[..., None] * Bm[:, None, :, t]
        ys.append(((h * Cm[:, None, :, t]).sum(-1) + Dv * u[..., t]) * F.silu(z[..., t]))
    return torch.stack(ys, -1), h


# -- the initial-state correction ----------------------------------------------------------------

@pytest.mark.parametrize("piece", [1, 4, 64])
def test_h0_correction_is_exact_in_fp64(piece):
    u, delta, A, Bm, Cm, Dv, z, h0 = _ssm_inputs(dtype=torch.float64)
    y_h0, h_h0 = _loop_scan(u, delta, A, Bm, Cm, Dv, z, h0)
    y_0, h_0 = _loop_scan(u, delta, A, Bm, Cm, Dv, z, torch.zeros_like(h0))
    y_corr, h_corr = fused.scan_h0_correction(delta, A, Cm, z, h0, piece=piece)
    assert y_corr.dtype == torch.float64
    torch.testing.assert_close(y_0 + y_corr, y_h0, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h_0 + h_corr, h_h0, atol=1e-12, rtol=1e-12)


def test_h0_correction_matches_selective_scan_ref_in_fp32():
    u, delta, A, Bm, Cm, Dv, z, h0 = _ssm_inputs(B=2, D=32, T=300, N=16, seed=1)
    y_want, h_want = ops.selective_scan_ref(u, delta, A, Bm, Cm, Dv, z, h0)
    y_0, h_0 = ops.selective_scan_ref(u, delta, A, Bm, Cm, Dv, z, torch.zeros_like(h0))
    y_corr, h_corr = fused.scan_h0_correction(delta, A, Cm, z, h0)
    torch.testing.assert_close(y_0 + y_corr, y_want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(h_0 + h_corr, h_want, atol=2e-5, rtol=1e-5)
    # and h0 matters here, so the comparison above is not vacuous
    assert (y_0 - y_want).abs().max() > 1e-2


# -- each wrapper's composition, driven by an independent zero-state implementation ----------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
def test_scan_wrapper_with_zero_state_slow_path_equals_ref_from_h0(dtype, tol):
    u, delta, A, Bm, Cm, Dv, z, h0 = _ssm_inputs(D=16, T=40, seed=2)
    u, Bm, Cm, z = (t.to(dtype) for t in (u, Bm, Cm, z))
    y, h = fused.selective_scan_fused(u, delta, A, Bm, Cm, Dv, z, h0, kernel=_slow("mamba_selective_scan"))
    y_want, h_want = ops.selective_scan_ref(u, delta, A, Bm, Cm, Dv, z, h0)
    assert y.dtype == dtype and h.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(h, h_want, atol=2e-5, rtol=1e-5)


def test_state_update_wrapper_with_slow_path_kernel_equals_ref():
    u, delta, A, Bm, Cm, Dv, z, h0 = _ssm_inputs(time=False, seed=3)
    h_got, h_want = h0.clone(), h0.clone()
    y = fused.selective_state_update_fused(h_got, u, delta, A, Bm, Cm, Dv, z,
                                           kernel=_slow("mamba_selective_state_update"))
    y_want = ops.selective_state_update_ref(h_want, u, delta, A, Bm, Cm, Dv, z)
    torch.testing.assert_close(y, y_want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_got, h_want, atol=1e-6, rtol=1e-6)


def _width_k_update(x, conv_state, weight, bias=None, activation=None):
    """causal-conv1d < 1.4 semantics: state of width K, shifted first, then the whole window."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    y = (conv_state * weight).sum(-1) + (bias if bias is not None else 0)
    return F.silu(y) if activation == "silu" else y


def test_conv_update_width_k_adapter_equals_ref():
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(2, 16, generator=g), torch.randn(16, 4, generator=g), torch.randn(16, generator=g)
    state = torch.randn(2, 16, 3, generator=g)
    s_got, s_want = state.clone(), state.clone()
    for _ in range(3):  # several steps, so the shifted state is exercised too
        y = fused.causal_conv1d_update_fused(x, s_got, w, b, kernel=_width_k_update, full_width_state=True)
        y_want = ops.causal_conv1d_update_ref(x, s_want, w, b)
        torch.testing.assert_close(y, y_want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(s_got, s_want)
        x = x.flip(0)


def test_channel_last_view_keeps_values_and_gets_stride_one():
    t = torch.randn(2, 16, 3)
    cl = fused._channel_last(t)
    assert cl.stride(1) == 1 and cl.stride(2) > 1
    assert torch.equal(cl, t)


# -- the `_ref` ops against transformers' slow path (independent implementations) -------------------

def test_selective_scan_ref_matches_transformers_slow_path_from_zero():
    u, delta, A, Bm, Cm, Dv, z, h0 = _ssm_inputs(B=2, D=32, T=50, N=16, seed=5)
    y, h = ops.selective_scan_ref(u, delta, A, Bm, Cm, Dv, z, torch.zeros_like(h0))
    y_tf, h_tf = _slow("mamba_selective_scan")(u, delta, A, Bm, Cm, Dv, z, return_last_state=True)
    torch.testing.assert_close(y, y_tf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_tf, atol=1e-5, rtol=1e-5)


def test_selective_state_update_ref_matches_transformers_slow_path():
    u, delta, A, Bm, Cm, Dv, z, h0 = _ssm_inputs(time=False, seed=6)
    h_ref, h_tf = h0.clone(), h0.clone()
    y = ops.selective_state_update_ref(h_ref, u, delta, A, Bm, Cm, Dv, z)
    y_tf = _slow("mamba_selective_state_update")(h_tf, u, delta, A, Bm, Cm, D=Dv, z=z)
    torch.testing.assert_close(y, y_tf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_ref, h_tf, atol=1e-6, rtol=1e-6)


def test_causal_conv1d_ref_matches_transformers_slow_path_from_zero():
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(2, 24, 13, generator=g), torch.randn(24, 4, generator=g), torch.randn(24, generator=g)
    y, final = ops.causal_conv1d_ref(x, w, b, torch.zeros(2, 24, 3))
    torch.testing.assert_close(y, _slow("causal_conv1d_fn")(x, w, b, activation="silu"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, x[..., -3:])


def test_causal_conv1d_update_ref_matches_transformers_slow_path():
    g = torch.Generator().manual_seed(8)
    x, w, b = torch.randn(3, 24, generator=g), torch.randn(24, 4, generator=g), torch.randn(24, generator=g)
    state = torch.randn(3, 24, 3, generator=g)
    s_ref, s_tf = state.clone(), state.clone()
    y = ops.causal_conv1d_update_ref(x, s_ref, w, b)
    y_tf = _slow("causal_conv1d_update")(x.unsqueeze(-1), s_tf, w, b, activation="silu").squeeze(-1)
    torch.testing.assert_close(y, y_tf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_ref, s_tf)


# -- loading and the engine hook on this machine ------------------------------------------------------

@pytest.mark.skipif(CUDA, reason="checks the no-CUDA behaviour")
def test_without_cuda_the_reference_path_runs_and_says_why():
    assert select_ops("cpu").paths == REFERENCE.paths
    assert "cpu" in select_ops("cpu").reason
    engine = Engine(tiny_random("cpu", torch.float32))
    assert engine.graphs is None
    report = engine.kernel_report()
    assert report["scan"] == "reference" and report["decode_graph"].startswith("off")
    assert DecodeGraphs.for_device(engine.model, engine.consts, engine.ops, torch.device("cpu")) is None


def test_load_names_every_op_or_says_why_not():
    opset, why = fused.load()
    if opset is None:
        assert why.startswith("no fused kernels:") and "not importable" in why
    else:
        assert set(opset.paths) == {"conv", "conv_update", "scan", "state_update"}
        assert all(p == "reference" or p.startswith("fused: ") for p in opset.paths.values())


# -- on CUDA: the real kernels and graphs ---------------------------------------------------------------

def _cuda_fused():
    opset, why = fused.load()
    if opset is None:
        pytest.skip(f"fused kernels not available on this CUDA machine: {why}")
    return opset


@needs_cuda
def test_fused_ops_match_ref_on_cuda():
    from kernels_check.checks import fused_op_checks

    rows = [r for r in fused_op_checks(_cuda_fused(), "cuda") if r["status"] != "skipped"]
    assert rows, "no fused op was checked"
    assert [r for r in rows if r["status"] == "fail"] == []


@needs_cuda
def test_fused_engine_matches_reference_engine_on_cuda():
    from kernels_check.model_check import decode_step_checks, model_check

    opset = _cuda_fused()
    assert model_check("cuda", opset, "")["status"] == "ok"
    assert all(r["status"] == "ok" for r in decode_step_checks("cuda", opset, ""))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_step_equals_eager_step(dtype):
    model = tiny_random("cuda", dtype)
    graphed, eager = Engine(model), Engine(model, cuda_graphs=False)
    ids = torch.randint(0, 512, (2, 12), device="cuda")
    s_g, s_e = graphed.new_state(2), eager.new_state(2)
    graphed.prefill(ids, s_g)
    eager.prefill(ids, s_e)
    for t in range(5):
        torch.testing.assert_close(graphed.step(ids[:, t], s_g), eager.step(ids[:, t], s_e), atol=1e-5, rtol=1e-5)
    assert graphed.graphs.captured(2), graphed.kernel_report()["decode_graph"]
    torch.testing.assert_close(s_g.ssm, s_e.ssm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_g.conv, s_e.conv)
