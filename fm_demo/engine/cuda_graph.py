"""CUDA-graph replay of the single-token decode step, with static buffers.

A decode step of a 7B Mamba launches thousands of small kernels; at batch 1 their launch gaps,
not the weight reads, would set the pace. As in mamba-ssm's generation utilities, the step is
captured once per batch size into a CUDA graph over static input/state/output buffers and
replayed for every token.

The batching scheduler's slot buffers are long-lived, so its graphs (one per batch bucket 1, 2,
4, ... 64) are captured on those buffers themselves and a replay moves no state. A State passed to
Engine.step belongs to a conversation, so that replay copies it into the graph's own buffers and
back out (about 2 x 37 MB per row for the 7B, ~1% of the weight traffic of a step).

Exactness is checked, not assumed: the first replay for each batch size is compared with an
eager step from the same state, and the graph is used only if they agree. Any failure (capture
refused, disagreement) leaves that batch size on the eager path, with the reason in `status`.
Set FM_DEMO_CUDA_GRAPHS=0 to turn graphs off.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .kernels import OpSet
from .mixer import LayerConsts, forward_step

MAX_GRAPH_BATCH = 64  # buckets 1, 2, 4, ..., 64 (the scheduler pads to them); larger run eagerly
EXACT_RTOL = 1e-3  # replay vs eager, relative to the largest magnitude; identical kernels give 0


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    ids: Tensor  # [B] long
    conv: Tensor  # [L, B, D, K-1]
    ssm: Tensor  # [L, B, D, N] fp32
    logits: Tensor  # [B, V] fp32


def graphs_enabled() -> bool:
    return os.environ.get("FM_DEMO_CUDA_GRAPHS", "1").strip().lower() not in ("0", "false", "no")


def max_rel_diff(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max(1, max |want|)."""
    scale = max(1.0, float(want.abs().max()))
    return float((got.float() - want.float()).abs().max()) / scale


class DecodeGraphs:
    """Graph-captured forward_step for one model and op set, one graph per batch size."""

    def __init__(self, model: nn.Module, consts: list[LayerConsts], ops: OpSet, n_warmup: int = 2):
        self.model, self.consts, self.ops, self.n_warmup = model, consts, ops, n_warmup
        self._graphs: dict[tuple, _Captured] = {}  # (batch, buffers or None) -> graph
        self._refused: dict[int, str] = {}
        self._pool = None
        self._lock = threading.Lock()  # replays share the static buffers

    @classmethod
    def for_device(cls, model: nn.Module, consts: list[LayerConsts], ops: OpSet,
                   device: torch.device) -> DecodeGraphs | None:
        """A graph runner on CUDA with graphs enabled, else None (the engine steps eagerly)."""
        if device.type != "cuda" or not graphs_enabled():
            return None
        return cls(model, consts, ops)

    def captured(self, batch: int) -> bool:
        return any(b == batch for b, _ in self._graphs)

    @property
    def status(self) -> str:
        parts = [f"batch {b}{' (static buffers)' if bound else ''}: captured, exact" for b, bound in sorted(
            self._graphs, key=lambda k: (k[0], k[1] is not None))]
        parts += [f"batch {b}: eager ({why})" for b, why in sorted(self._refused.items())]
        return "; ".join(parts) or "CUDA graphs enabled, none captured yet"

    def step(self, ids: Tensor, conv: Tensor, ssm: Tensor, static: bool = False) -> Tensor | None:
        """Logits [B, V] of ids [B] with conv/ssm advanced in place, or None to step eagerly.

        static=True: conv/ssm are long-lived buffers (a scheduler's slots, views included) and the
        graph is captured on them, so a replay copies no state; other callers' states are copied
        into the graph's own buffers and back.
        """
        batch = ids.shape[0]
        if batch in self._refused:
            return None
        if batch > MAX_GRAPH_BATCH:
            self._refused[batch] = f"batch above {MAX_GRAPH_BATCH}"
            return None
        key = (batch, _where(conv, ssm) if static else None)
        with self._lock:
            if key not in self._graphs:
                return self._capture_and_verify(key, ids, conv, ssm)
            return self._replay(self._graphs[key], ids, conv, ssm)

    def _replay(self, g: _Captured, ids: Tensor, conv: Tensor, ssm: Tensor) -> Tensor:
        g.ids.copy_(ids)
        bound = _where(g.conv, g.ssm) == _where(conv, ssm)
        if not bound:
            g.conv.copy_(conv)
            g.ssm.copy_(ssm)
        g.graph.replay()
        if not bound:
            conv.copy_(g.conv)
            ssm.copy_(g.ssm)
        return g.logits.clone()

    def _capture(self, batch: int, conv: Tensor, ssm: Tensor, static: bool) -> _Captured:
        ids = torch.zeros(batch, dtype=torch.long, device=conv.device)
        s_conv, s_ssm = (conv, ssm) if static else (torch.zeros_like(conv), torch.zeros_like(ssm))
        side = torch.cuda.Stream(device=conv.device)
        side.wait_stream(torch.cuda.current_stream(conv.device))
        with torch.cuda.stream(side):  # warm-up: lazy inits, Triton compiles, cuBLAS handles
            for _ in range(self.n_warmup):
                forward_step(self.model, self.consts, self.ops, ids, s_conv, s_ssm)
        torch.cuda.current_stream(conv.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = forward_step(self.model, self.consts, self.ops, ids, s_conv, s_ssm)
        return _Captured(graph, ids, s_conv, s_ssm, logits)

    def _capture_and_verify(self, key, ids: Tensor, conv: Tensor, ssm: Tensor) -> Tensor | None:
        """Capture, then replay once against an eager step from a copy of the same state.

        A static capture warms up on the caller's buffers, so their contents are saved first and
        put back before the check.
        """
        batch, static = key[0], key[1] is not None
        saved_conv, saved_ssm = conv.clone(), ssm.clone()
        try:
            captured = self._capture(batch, conv, ssm, static)
        except Exception as e:  # capture refused by an op (host sync, unsupported kernel, ...)
            conv.copy_(saved_conv)
            ssm.copy_(saved_ssm)
            self._refused[batch] = f"capture failed: {type(e).__name__}: {e}"
            return None
        conv.copy_(saved_conv)
        ssm.copy_(saved_ssm)
        e_conv, e_ssm = saved_conv.clone(), saved_ssm.clone()
        want = forward_step(self.model, self.consts, self.ops, ids, e_conv, e_ssm)
        got = self._replay(captured, ids, conv, ssm)
        diff = max(max_rel_diff(got, want), max_rel_diff(conv, e_conv), max_rel_diff(ssm, e_ssm))
        if diff > EXACT_RTOL:
            conv.copy_(e_conv)
            ssm.copy_(e_ssm)
            self._refused[batch] = f"replay differs from the eager step by {diff:.2e} (> {EXACT_RTOL})"
            return want
        self._graphs[key] = captured
        return got


def _where(conv: Tensor, ssm: Tensor) -> tuple:
    """Where two state tensors live: equal for the same buffers (a view made again included)."""
    return tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in (conv, ssm))
