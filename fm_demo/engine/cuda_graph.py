"""CUDA-graph replay of the single-token decode step, with static buffers.

A decode step of a 7B Mamba launches thousands of small kernels; at batch 1 their launch gaps,
not the weight reads, would set the pace. As in mamba-ssm's generation utilities, the step is
captured once per batch size into a CUDA graph over static input/state/output buffers and
replayed for every token.

The engine's states belong to conversations, so a replay copies the caller's state into the
static buffers and back out (about 2 x 37 MB for the 7B, ~1% of the weight traffic of a step);
capturing one graph per state would be faster by that 1% and cost a capture per conversation.

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
        self._graphs: dict[int, _Captured] = {}
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
        return batch in self._graphs

    @property
    def status(self) -> str:
        parts = [f"batch {b}: captured, exact" for b in sorted(self._graphs)]
        parts += [f"batch {b}: eager ({why})" for b, why in sorted(self._refused.items())]
        return "; ".join(parts) or "CUDA graphs enabled, none captured yet"

    def step(self, ids: Tensor, conv: Tensor, ssm: Tensor) -> Tensor | None:
        """Logits [B, V] of ids [B] with conv/ssm advanced in place, or None to step eagerly."""
        batch = ids.shape[0]
        if batch in self._refused:
            return None
        if batch > MAX_GRAPH_BATCH:
            self._refused[batch] = f"batch above {MAX_GRAPH_BATCH}"
            return None
        with self._lock:
            if batch not in self._graphs:
                return self._capture_and_verify(ids, conv, ssm)
            return self._replay(self._graphs[batch], ids, conv, ssm)

    def _replay(self, g: _Captured, ids: Tensor, conv: Tensor, ssm: Tensor) -> Tensor:
        g.ids.copy_(ids)
        g.conv.copy_(conv)
        g.ssm.copy_(ssm)
        g.graph.replay()
        conv.copy_(g.conv)
        ssm.copy_(g.ssm)
        return g.logits.clone()

    def _capture(self, batch: int, conv: Tensor, ssm: Tensor) -> _Captured:
        ids = torch.zeros(batch, dtype=torch.long, device=conv.device)
        s_conv, s_ssm = torch.zeros_like(conv), torch.zeros_like(ssm)
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

    def _capture_and_verify(self, ids: Tensor, conv: Tensor, ssm: Tensor) -> Tensor | None:
        """Capture, then replay once against an eager step from a copy of the same state."""
        batch = ids.shape[0]
        try:
            captured = self._capture(batch, conv, ssm)
        except Exception as e:  # capture refused by an op (host sync, unsupported kernel, ...)
            self._refused[batch] = f"capture failed: {type(e).__name__}: {e}"
            return None
        e_conv, e_ssm = conv.clone(), ssm.clone()
        want = forward_step(self.model, self.consts, self.ops, ids, e_conv, e_ssm)
        got = self._replay(captured, ids, conv, ssm)
        diff = max(max_rel_diff(got, want), max_rel_diff(conv, e_conv), max_rel_diff(ssm, e_ssm))
        if diff > EXACT_RTOL:
            conv.copy_(e_conv)
            ssm.copy_(e_ssm)
            self._refused[batch] = f"replay differs from the eager step by {diff:.2e} (> {EXACT_RTOL})"
            return want
        self._graphs[batch] = captured
        return got
