"""Engine: exact chunked prefill from any state, single-token steps and streaming decode.

Invariant kept by every method: a State holds exactly the tokens it has been fed (State.seqlen),
so continuing from it equals re-reading the whole history from scratch.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from .cuda_graph import MAX_GRAPH_BATCH, DecodeGraphs
from .decode import PLAIN, DecodeOptions, DecodeRow, StreamMetrics, TokenEvent
from .kernels import OpSet, select_ops
from .mixer import forward_chunk, forward_step, head, layer_consts
from .sampling import SamplingParams
from .state import State, StateError, model_signature, state_bytes, zero_state

DEFAULT_CHUNK = 256


class Engine:
    """Wraps a transformers FalconMambaForCausalLM (fp32, bf16 or bitsandbytes 4-bit)."""

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK, ops: OpSet | None = None,
                 cuda_graphs: bool = True):
        if getattr(model.config, "model_type", None) not in ("falcon_mamba", "mamba"):
            raise TypeError(f"Engine needs a Falcon Mamba model, got {type(model).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model.eval()
        self.config = model.config
        self.chunk_size = chunk_size
        self.device = model.backbone.embeddings.weight.device
        self.dtype = model.backbone.embeddings.weight.dtype
        self.ops = ops or select_ops(self.device)
        self.consts = [layer_consts(b.mixer) for b in model.backbone.layers]
        self.signature = model_signature(model)
        # CUDA-graph decode (cuda_graph.py): None off CUDA or when turned off; per batch size it
        # falls back to eager
        self.graphs = DecodeGraphs.for_device(self.model, self.consts, self.ops, self.device) if cuda_graphs else None

    # -- state -------------------------------------------------------------------------------
    def new_state(self, batch_size: int = 1, device: torch.device | str | None = None) -> State:
        """A zero state (the empty context), on the model's device unless `device` says otherwise."""
        conv, ssm = zero_state(self.config, batch_size, self.dtype, self.device if device is None else device)
        return State(conv, ssm, self.signature)

    def state_nbytes(self, batch_size: int = 1) -> int:
        return state_bytes(self.config, self.dtype, torch.float32, batch_size)

    def kernel_report(self) -> dict[str, str]:
        graphs = self.graphs.status if self.graphs is not None else "off (not on CUDA, or FM_DEMO_CUDA_GRAPHS=0)"
        return {**self.ops.paths, "reason": self.ops.reason, "decode_graph": graphs}

    # -- checks ------------------------------------------------------------------------------
    def check_state(self, state: State, batch: int) -> None:
        if not isinstance(state, State):
            raise TypeError(f"state must be a State, got {type(state).__name__}")
        if state.signature != self.signature:
            raise StateError("this state belongs to another model; start a new state for this one")
        if state.batch_size != batch:
            raise StateError(f"state batch size {state.batch_size} does not match input batch {batch}")
        if state.device != self.device:
            raise StateError(f"state is on {state.device}, model on {self.device}")
        state.own()  # a state restored from bytes may sit in unaligned storage: see State.own

    def check_ids(self, ids: Tensor, ndim: int) -> Tensor:
        if not isinstance(ids, Tensor):
            raise TypeError(f"token ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be int64 or int32, got {ids.dtype}")
        if ids.ndim != ndim:
            want = "[batch, tokens]" if ndim == 2 else "[batch]"
            raise ValueError(f"token ids must have shape {want}, got {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError("token ids are empty: nothing to read")
        vocab = self.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}), got min {int(ids.min())} max {int(ids.max())}")
        return ids.to(self.device, torch.long)

    # -- compute -----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids: Tensor, state: State, all_logits: bool = False,
                progress: Callable[[int, int], None] | None = None) -> Tensor:
        """Read input_ids [B, T] into `state` (in place), chunk by chunk.

        Returns logits of the last position [B, V], or of every position [B, T, V]. Memory is
        bounded by the chunk size, not by T; only the requested logits are materialised.
        """
        ids = self.check_ids(input_ids, 2)
        self.check_state(state, ids.shape[0])
        T, outs = ids.shape[1], []
        for start in range(0, T, self.chunk_size):
            chunk = ids[:, start:start + self.chunk_size]
            hidden, conv, ssm = forward_chunk(self.model, self.consts, self.ops, chunk, state.conv, state.ssm)
            state.conv.copy_(conv)
            state.ssm.copy_(ssm)
            state.seqlen += chunk.shape[1]
            if all_logits:
                outs.append(head(self.model, hidden))
            elif start + self.chunk_size >= T:  # only the last position's logits are wanted
                outs.append(head(self.model, hidden[:, -1]))
            if progress is not None:
                progress(min(start + self.chunk_size, T), T)
        return torch.cat(outs, dim=1) if all_logits else outs[-1]

    @torch.inference_mode()
    def step(self, token_ids: Tensor, state: State) -> Tensor:
        """Feed one token per row, token_ids [B], and return the next logits [B, V]."""
        ids = self.check_ids(token_ids, 1)
        self.check_state(state, ids.shape[0])
        logits = self.decode_step(ids, state.conv, state.ssm)
        state.seqlen += 1
        return logits

    @torch.inference_mode()
    def decode_step(self, ids: Tensor, conv: Tensor, ssm: Tensor, static: bool = False) -> Tensor:
        """One token per row on raw state tensors (no checks): ids [B] long on the device,
        conv [L, B, D, K-1], ssm [L, B, D, N] (views of bigger buffers are fine), advanced in
        place; returns logits [B, V]. Replays a CUDA graph for B where one is captured;
        static=True: the tensors are long-lived buffers the graph may be captured on."""
        logits = self.graphs.step(ids, conv, ssm, static) if self.graphs is not None else None
        if logits is None:
            logits = forward_step(self.model, self.consts, self.ops, ids, conv, ssm)
        return logits

    def decode_bucket(self, rows: int) -> int:
        """The batch a decode step of `rows` rows runs at: `rows` when stepping eagerly, else the
        next CUDA-graph size (powers of two), so a few graphs serve every batch size."""
        if self.graphs is None or rows > MAX_GRAPH_BATCH:
            return rows
        return 1 << (rows - 1).bit_length()

    def stream(self, input_ids: Tensor, state: State, sampling: SamplingParams | None = None,
               max_new_tokens: int = 256, stop_token_ids: Iterable[int] = (),
               tokenizer: object | None = None, context_ids: Tensor | None = None,
               options: DecodeOptions = PLAIN) -> Iterator[TokenEvent]:
        """Prefill input_ids [1, T] into `state`, then sample up to max_new_tokens tokens.

        Each token is fed into the state before it is yielded, so whenever the consumer stops
        (finished, or closed mid-reply) the state holds exactly prompt + yielded tokens.
        context_ids [1, S] are earlier tokens the repetition penalty should also see.
        """
        ids = self.check_ids(input_ids, 2)
        if ids.shape[0] != 1:
            raise ValueError("stream decodes one sequence at a time (batch size 1)")
        context = ids[0] if context_ids is None else torch.cat([context_ids.reshape(-1).to(self.device), ids[0]])
        row = DecodeRow(sampling or SamplingParams(), max_new_tokens, stop_token_ids, tokenizer, context,
                        self.config.vocab_size, self.device, StreamMetrics(prompt_tokens=ids.shape[1]), options)
        t0 = time.perf_counter()
        logits = self.prefill(ids, state)
        row.metrics.prefill_s = time.perf_counter() - t0
        while True:
            tok = row.choose(logits)
            logits = self.step(torch.tensor([tok], device=self.device), state)
            event = row.emit(tok, t0)
            yield event
            if event.finish_reason:
                return
