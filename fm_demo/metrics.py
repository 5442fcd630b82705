"""Per-reply metrics, memory probes and the transformer KV-cache comparison.

The comparison numbers: a transformer of similar size (Llama-3-8B / Mistral-7B: 32 layers, 8 KV
heads of dimension 128, bf16) stores 2 x 32 x 8 x 128 x 2 bytes = 128 KiB of KV cache per token
of context; Falcon Mamba keeps a fixed-size state instead (`fm_demo.engine.state.state_bytes`).
"""

from __future__ import annotations

import gc
import sys
from dataclasses import asdict, dataclass

import torch


@dataclass
class ReplyMetrics:
    reused_tokens: int = 0  # history tokens taken from the cached state, not read again
    prefilled_tokens: int = 0  # tokens read by prefill for this reply (rebuilt + new turn)
    rebuilt_tokens: int = 0  # of those, history re-read because its cached state was evicted
    rebuilt_reason: str = ""  # why, when not eviction (templates.REWRITE_REASON: the chat template rewrote earlier turns)
    new_tokens: int = 0  # generated tokens
    ttft_s: float = 0.0  # from the request to the first generated token
    prefill_s: float = 0.0
    decode_s: float = 0.0  # after the first token
    state_bytes: int = 0  # the conversation's recurrent state (constant in context length)
    cache_bytes: int = 0  # its state plus turn snapshots kept for retry / undo / edit
    context_tokens: int = 0  # tokens in the conversation after this reply
    device: str = "cpu"
    device_mem_bytes: int = 0  # now: CUDA allocated, or the process RSS on CPU
    device_peak_bytes: int = 0  # peak since the process started (CUDA allocator / max RSS)
    cache_hit: bool = True  # False when evicted history had to be read again
    finish_reason: str | None = None  # stop | length | stop_string | cancelled | error
    model: str = ""
    batch_size: int = 1  # rows decoded together in the reply's last step (continuous batching)
    batch_mean: float = 1.0  # mean rows per decode step over the reply
    replies: int = 1  # Show N replies: rows sampled from this one read of the prompt
    served_by: str = ""  # on a cluster: the model replica that served the reply
    state_source: str = ""  # on a cluster: where that replica's starting state came from

    @property
    def prefill_tok_s(self) -> float:
        return rate(self.prefilled_tokens, self.prefill_s)

    @property
    def decode_tok_s(self) -> float:
        return rate(self.new_tokens - 1, self.decode_s) if self.new_tokens > 1 else 0.0

    @property
    def kv_cache_equiv_bytes(self) -> int:
        """What a transformer of similar size would hold for the same context."""
        return kv_cache_bytes(self.context_tokens)

    def as_dict(self) -> dict:
        return {**asdict(self), "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
                "kv_cache_equiv_bytes": self.kv_cache_equiv_bytes}


def rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 and tokens > 0 else 0.0


@dataclass(frozen=True)
class KVReference:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_value: int

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_value  # K and V


KV_REFERENCE = KVReference("Llama-3-8B / Mistral-7B (bf16)", layers=32, kv_heads=8, head_dim=128,
                           bytes_per_value=2)


def kv_cache_bytes(tokens: int, ref: KVReference = KV_REFERENCE) -> int:
    return tokens * ref.bytes_per_token


def device_memory(device: str | torch.device) -> tuple[int, int]:
    """(bytes now, peak bytes) on `device`: the CUDA allocator, or this process's RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    import psutil

    rss = psutil.Process().memory_info().rss
    return rss, max(rss, _max_rss())


def _max_rss() -> int:
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def free_device_memory(device: str | torch.device) -> None:
    """Hand memory no tensor holds any more back: collect garbage, then empty CUDA's cache."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
