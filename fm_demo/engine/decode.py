"""One row's decoding, written once: the scheduler's batched steps and Engine.stream both use it.

A DecodeRow holds everything per reply that is not the recurrent state: its sampling settings
and generator, the repetition-penalty mask, its stop tokens and length limit, the incremental
detokenizer and its metrics, and the optional processing of DecodeOptions (log-probabilities,
logit bias, frequency and presence penalties, a minimum length, a grammar's token mask). The
caller runs the model; the row only
  choose(logits [1, V]) -> the next token id (sampled with the row's own settings), and
  emit(token_id) -> the TokenEvent for a token that has just been fed into the state.

The logits a token is drawn from are processed in this order: repetition penalty (CTRL's),
frequency and presence penalties (OpenAI's: logit -= count * f + [count > 0] * p, counting this
reply's tokens), logit bias, the minimum length (stop tokens masked until then; with a grammar,
the grammar alone decides where the reply ends), the grammar's mask (tokens it does not allow
next get -inf); then temperature, top-k, top-p and the draw.
A token's log-probability, and its alternatives', are log_softmax of the processed logits divided
by the temperature (1 when greedy): everything that changes the distribution the token was drawn
from except the top-k and top-p cuts, which would give every other token -inf.

Per-token cost does not depend on the context: the repetition penalty reads a boolean mask over
the vocabulary [V], built once from the context and updated with one token per step (CTRL's
penalty treats a token seen once or many times alike, so a mask is exactly the set of seen ids);
the frequency counts are a [V] vector updated the same way. A row that asks for none of the
options pays nothing for them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .sampling import SamplingParams, make_generator, sample

MAX_TOP_LOGPROBS = 20  # alternatives per token a row may ask for (OpenAI's cap)


@dataclass(frozen=True)
class DecodeOptions:
    """Per-row processing beyond SamplingParams (see the module docstring for the order)."""

    logprobs: int | None = None  # None: none; k >= 0: the token's log-probability and the k likeliest
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_tokens: int = 0  # stop tokens cannot end the reply before this many tokens
    grammar: object | None = None  # a compiled grammar (engine/constraints.py); each row its own matcher

    def __post_init__(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be from 0 to {MAX_TOP_LOGPROBS}, got {self.logprobs}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be from -2 to 2, got {getattr(self, name)}")
        if any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be from -100 to 100")


PLAIN = DecodeOptions()


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
    logprob: float | None = None  # with DecodeOptions.logprobs: this token's log-probability
    top_logprobs: tuple[tuple[int, float], ...] = ()  # and the likeliest tokens', most likely first


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
                 metrics: StreamMetrics | None = None, options: DecodeOptions = PLAIN):
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
        self.options = options
        self.counts: Tensor | None = None  # [V] this reply's token counts, only with those penalties
        if options.frequency_penalty or options.presence_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.bias: tuple[Tensor, Tensor] | None = None
        if options.logit_bias:
            ids, values = zip(*options.logit_bias)
            self.bias = (torch.tensor(ids, device=device), torch.tensor(values, device=device))
        self.stop_ids = torch.tensor(sorted(self.stops), dtype=torch.long, device=device)
        self.matcher = options.grammar.matcher() if options.grammar is not None else None
        self.allowed = torch.zeros(vocab_size, dtype=torch.bool, device="cpu") if self.matcher else None
        self._logprob: tuple[float, tuple[tuple[int, float], ...]] | None = None

    def choose(self, logits: Tensor) -> int:
        """The next token from logits [1, V] with the row's settings; it joins the penalty's mask."""
        logits = self.process(logits)
        tok = int(sample(logits, self.sampling, self.gen))
        if self.options.logprobs is not None:
            self._logprob = self._logprobs(logits, tok)
        if self.seen is not None:
            self.seen[tok] = True
        if self.counts is not None:
            self.counts[tok] += 1
        if self.matcher is not None and tok not in self.stops:
            self.matcher.advance(tok)
        return tok

    def process(self, logits: Tensor) -> Tensor:
        """The logits [1, V] the next token is drawn from (penalties, bias, masks: module docstring)."""
        opts = self.options
        if self.seen is not None:
            logits = penalize(logits, self.seen, self.sampling.repetition_penalty)
        if self.counts is None and self.bias is None and self.matcher is None and self.emitted >= opts.min_tokens:
            return logits
        logits = logits.float().clone()
        if self.counts is not None:
            logits -= self.counts * opts.frequency_penalty + (self.counts > 0).float() * opts.presence_penalty
        if self.bias is not None:
            logits[0].index_add_(0, self.bias[0], self.bias[1])
        if self.emitted < opts.min_tokens and self.stop_ids.numel() and self.matcher is None:
            logits[0, self.stop_ids] = float("-inf")
        if self.matcher is not None:
            self.matcher.allowed(self.allowed)
            logits[0].masked_fill_(~self.allowed.to(logits.device), float("-inf"))
        return logits

    def _logprobs(self, logits: Tensor, tok: int) -> tuple[float, tuple[tuple[int, float], ...]]:
        t = self.sampling.temperature or 1.0
        lp = torch.log_softmax(logits[0].float() / t, -1)
        k = self.options.logprobs
        top = ()
        if k:
            values, ids = torch.topk(lp, min(k, lp.shape[-1]))
            top = tuple(zip(ids.tolist(), values.tolist()))
        return float(lp[tok]), top

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
        logprob, top = self._logprob if self._logprob is not None else (None, ())
        self._logprob = None
        return TokenEvent(token_id, text, index, m, finish, logprob, top)
