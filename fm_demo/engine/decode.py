"""One row's decoding, written once: the scheduler's batched steps and Engine.stream both use it.

A DecodeRow holds everything per reply that is not the recurrent state: its sampling settings
and generator, the repetition-penalty mask, its stop tokens and length limit, the incremental
detokenizer and its metrics. The caller runs the model; the row only
  choose(logits [1, V]) -> the next token id (sampled with the row's own settings), and
  emit(token_id) -> the TokenEvent for a token that has just been fed into the state.

Per-token cost does not depend on the context: the repetition penalty reads a boolean mask over
the vocabulary [V], built once from the context and updated with one token per step (CTRL's
penalty treats a token seen once or many times alike, so a mask is exactly the set of seen ids).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .sampling import SamplingParams, make_generator, sample


@dataclass
class StreamMetrics:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # from the call to the first token
    new_tokens: int = 0
    decode_s: float = 0.0  # time spent after the first token
    batch_size: int = 1  # rows in the decode step that produced the latest token
    batch_mean: float = 1.0  # mean rows per decode step over the reply

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"prompt_tokens": self.prompt_tokens, "prefill_s": self.prefill_s, "ttft_s": self.ttft_s,
                "new_tokens": self.new_tokens, "decode_s": self.decode_s,
                "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
                "batch_size": self.batch_size, "batch_mean": self.batch_mean}


@dataclass
class TokenEvent:
    token_id: int
    text: str  # the new piece of text ("" while a multi-byte character is incomplete)
    index: int  # 0-based position among generated tokens
    metrics: StreamMetrics
    finish_reason: str | None = None  # "stop" | "length" on the last event


@dataclass
class Detokenizer:
    """Incremental detokenization that never emits half a UTF-8 character.

    Only a window of recent ids is decoded per token (a few earlier ids give the new text its
    context, e.g. a leading space), so a long reply costs O(1) per token, not O(length).
    """

    tokenizer: object
    ids: list[int] = field(default_factory=list)
    prefix: int = 0  # window start: ids[prefix:read] decode to text already emitted
    read: int = 0  # ids before `read` have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(done) or not text.startswith(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]


def penalize(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019) over a mask: logits [1, V], seen [V] bool.
    Positive logits of seen tokens are divided by the penalty, negative ones multiplied."""
    logits = logits.float()
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


class DecodeRow:
    """The per-reply half of decoding (see the module docstring); the model step is the caller's."""

    def __init__(self, sampling: SamplingParams, max_new_tokens: int, stop_token_ids: Iterable[int] = (),
                 tokenizer: object | None = None, context: Sequence[int] | Tensor = (),
                 vocab_size: int = 0, device: torch.device | str = "cpu",
                 metrics: StreamMetrics | None = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.sampling, self.max_new_tokens = sampling, max_new_tokens
        self.stops = frozenset(int(t) for t in stop_token_ids)
        self.detok = Detokenizer(tokenizer) if tokenizer is not None else None
        self.gen = make_generator(sampling, device)
        self.seen: Tensor | None = None  # [V] bool, only with a repetition penalty
        if sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = context if isinstance(context, Tensor) else torch.tensor(list(context), dtype=torch.long)
            if ids.numel():
                self.seen[ids.reshape(-1).to(device, torch.long)] = True
        self.metrics = metrics or StreamMetrics()
        self.emitted = 0
        self.batch_sum = 0
        self.t_first = 0.0

    def choose(self, logits: Tensor) -> int:
        """The next token from logits [1, V] with the row's settings; it joins the penalty's mask."""
        if self.seen is not None:
            logits = penalize(logits, self.seen, self.sampling.repetition_penalty)
        tok = int(sample(logits, self.sampling, self.gen))
        if self.seen is not None:
            self.seen[tok] = True
        return tok

    def emit(self, token_id: int, t_start: float, batch: int = 1, now: float | None = None) -> TokenEvent:
        """The event for `token_id`, just fed into the state (t_start: when the request came in)."""
        now = time.perf_counter() if now is None else now
        m, index = self.metrics, self.emitted
        if index == 0:
            self.t_first = now
            m.ttft_s = now - t_start
        self.emitted += 1
        self.batch_sum += batch
        m.new_tokens, m.decode_s, m.batch_size = self.emitted, now - self.t_first, batch
        m.batch_mean = self.batch_sum / self.emitted
        stop = token_id in self.stops
        finish = "stop" if stop else ("length" if self.emitted >= self.max_new_tokens else None)
        text = self.detok.push(token_id) if self.detok is not None and not stop else ""
        return TokenEvent(token_id, text, index, m, finish)
