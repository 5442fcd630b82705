"""Constant-memory lab: decode speed and memory of Falcon Mamba against a growing KV cache.

Two measurements, both at batch 1 and in the same process:
1. Generate N tokens with the Falcon Mamba engine and with a randomly initialised Llama-style
   transformer of similar parameter count (transformers' LlamaForCausalLM with its DynamicCache),
   sampling tokens/s, cache bytes and device memory every `every` tokens.
2. "Longest prompt that fits": peak memory of reading a prompt in one parallel pass versus the
   engine's chunked prefill, against prompt length. The parallel pass is meant to run out of
   memory at some length, so it runs only where that harms no one (`parallel_ok`: on a serving
   GPU, when no request is running); otherwise its figure is computed from the chunked pass and
   marked as computed.

Memory is measured, not modelled: on CUDA from the caching allocator (memory_allocated and
max_memory_allocated); on CPU from the process's resident set size (RSS), sampled every
millisecond by a thread for peaks. RSS also counts the allocator's free lists, so CPU figures are
upper bounds with some noise; cache bytes are exact (summed tensor sizes).
Random weights are fine here: speed and memory depend on shapes, not on what the model learned.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .engine import Engine
from .metrics import device_memory

# Series names, short enough for a plot legend (it cuts labels at about 25 characters)
MAMBA = "Falcon Mamba (state)"
TRANSFORMER = "Transformer (KV cache)"
# The prefill sweep's prompt lengths: powers of two within these bounds, from half a chunk on
SWEEP_SHORTEST, SWEEP_LONGEST = 64, 1 << 21


@dataclass
class Sample:
    series: str  # MAMBA or TRANSFORMER
    tokens: int  # tokens generated so far
    tok_s: float  # decode speed over the last window
    cache_bytes: int  # per-sequence cache: recurrent state or KV cache
    memory_bytes: int  # device memory allocated now (CUDA) or process RSS (CPU)

    def as_dict(self) -> dict:
        return asdict(self)


def memory_now(device: torch.device) -> int:
    return device_memory(device)[0]


class PeakMemory:
    """Peak memory above the level at entry, while the `with` block runs (bytes)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._base = self._peak = memory_now(self.device)
        self._stop = threading.Event()
        if self.device.type != "cuda":
            self._thread = threading.Thread(target=self._sample_rss, daemon=True)
            self._thread.start()
        return self

    def _sample_rss(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, memory_now(self.device))

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, memory_now(self.device))
        self.peak_bytes = max(0, self._peak - self._base)


def n_params(model: nn.Module) -> int:
    """Parameter count; bitsandbytes 4-bit weights count by their unpacked shape."""
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += torch.Size(shape).numel() if shape is not None else p.numel()
    return total


def similar_llama_config(mamba_config, target_params: int):
    """A Llama-3-style config (GQA 4:1, SwiGLU 3.5x) with the Mamba's width, vocabulary and
    about `target_params` parameters; only the layer count is solved for."""
    from transformers import LlamaConfig

    h, vocab = mamba_config.hidden_size, mamba_config.vocab_size
    head_dim = 128 if h >= 1024 else 32
    heads = max(1, h // head_dim)
    kv_heads = max(1, heads // 4)
    ffn = int(3.5 * h) // 64 * 64 or 64
    per_layer = 2 * h * h + 2 * h * kv_heads * head_dim + 3 * h * ffn + 2 * h
    embed = 2 * vocab * h
    layers = max(1, round((target_params - embed) / per_layer))
    return LlamaConfig(
        hidden_size=h,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        max_position_embeddings=1 << 20,
        tie_word_embeddings=False,
    )


def similar_transformer(mamba_model: nn.Module) -> nn.Module:
    """A random-weight Llama-style model on the Mamba's device, in its compute dtype."""
    from transformers import LlamaForCausalLM

    emb = mamba_model.backbone.embeddings.weight
    dtype = emb.dtype if emb.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
    config = similar_llama_config(mamba_model.config, n_params(mamba_model))
    with torch.device(emb.device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_loop(
    series: str, device: torch.device, n_tokens: int, every: int, time_limit_s: float, step, cache_bytes
) -> Iterator[Sample]:
    """Call step() n_tokens times; every `every` tokens yield a Sample of the last window."""
    start = time.perf_counter()
    window_t, window_n = start, 0
    for i in range(1, n_tokens + 1):
        step()
        window_n += 1
        if i % every == 0 or i == n_tokens:
            _sync(device)
            now = time.perf_counter()
            yield Sample(series, i, window_n / (now - window_t), cache_bytes(), memory_now(device))
            window_t, window_n = now, 0
            if now - start > time_limit_s:
                return


@torch.inference_mode()
def mamba_decode(
    engine: Engine, n_tokens: int, every: int = 64, time_limit_s: float = float("inf")
) -> Iterator[Sample]:
    """Greedy decode from a one-token prompt through Engine.stream (the decode loop every reply
    uses); the state never grows."""
    state = engine.new_state()
    events = engine.stream(torch.zeros(1, 1, dtype=torch.long), state, max_new_tokens=n_tokens)
    try:
        yield from _timed_loop(MAMBA, engine.device, n_tokens, every, time_limit_s, lambda: next(events),
                               lambda: state.nbytes)
    finally:
        events.close()


@torch.inference_mode()
def transformer_decode(
    model: nn.Module, n_tokens: int, every: int = 64, time_limit_s: float = float("inf")
) -> Iterator[Sample]:
    """Greedy decode with transformers' DynamicCache, which grows by one K,V row per token."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    ids = [torch.zeros(1, 1, dtype=torch.long, device=device)]

    def step() -> None:
        out = model(input_ids=ids[0], cache=cache, use_cache=True)
        ids[0] = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]

    def kv_bytes() -> int:
        return sum(
            t.numel() * t.element_size()
            for layer in cache.layers
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if isinstance(t, torch.Tensor)
        )

    yield from _timed_loop(TRANSFORMER, device, n_tokens, every, time_limit_s, step, kv_bytes)


@dataclass
class PrefillPeak:
    prompt_tokens: int
    parallel_bytes: int | None  # None: the parallel pass ran out of memory
    chunked_bytes: int
    chunk_size: int
    parallel_computed: bool = False  # parallel_bytes computed (parallel_estimate), not measured


def parallel_estimate(chunked_bytes: int, prompt_tokens: int, chunk_size: int) -> int:
    """The parallel pass's peak from the chunked pass's: a pass's activations grow linearly with
    the tokens it reads at once, chunk_size for chunked prefill, all of them for the parallel pass."""
    return int(chunked_bytes * prompt_tokens / min(prompt_tokens, chunk_size))


def sweep_lengths(chunk_size: int, longest: int) -> list[int]:
    """Prompt lengths for prefill_peaks: doubling from the first power of two in the sweep's bounds
    that is at least half a chunk (shorter prompts read the same either way) up to `longest`."""
    n = SWEEP_SHORTEST
    while n < chunk_size // 2:
        n *= 2
    out = []
    while n <= min(longest, SWEEP_LONGEST):
        out.append(n)
        n *= 2
    return out


@torch.inference_mode()
def prefill_peaks(
    engine: Engine, lengths: list[int], chunk_size: int = 256, seed: int = 0,
    parallel_ok: Callable[[], bool] = lambda: True,
) -> Iterator[PrefillPeak]:
    """Peak memory of one parallel pass (one chunk of the whole prompt) versus chunked prefill.

    Both run the same engine code; only the chunk size differs, so the gap is the cost of
    materialising activations for every position at once. The parallel pass runs for a length
    only while parallel_ok() says so (asked before each); otherwise it is parallel_estimate's.
    """
    gen = torch.Generator().manual_seed(seed)
    parallel = Engine(engine.model, chunk_size=max(lengths), ops=engine.ops)
    chunked = Engine(engine.model, chunk_size=chunk_size, ops=engine.ops)
    chunked.prefill(torch.zeros(1, 2 * chunk_size, dtype=torch.long), chunked.new_state())  # warm-up
    for n in sorted(lengths):
        ids = torch.randint(0, engine.config.vocab_size, (1, n), generator=gen)
        chunked_bytes = _peak_or_none(chunked, ids) or 0
        if parallel_ok():
            yield PrefillPeak(n, _peak_or_none(parallel, ids), chunked_bytes, chunk_size)
        else:
            yield PrefillPeak(n, parallel_estimate(chunked_bytes, n, chunk_size), chunked_bytes, chunk_size, True)


def _peak_or_none(engine: Engine, ids: torch.Tensor, repeats: int = 2) -> int | None:
    """The smallest peak over `repeats` runs (RSS picks up allocator noise; CUDA is exact)."""
    peaks = []
    for _ in range(repeats if engine.device.type != "cuda" else 1):
        try:
            with PeakMemory(engine.device) as peak:
                engine.prefill(ids, engine.new_state())
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None
        peaks.append(peak.peak_bytes)
    return min(peaks)
