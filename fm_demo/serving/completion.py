"""Stateless completions: a whole prompt in, a reply out (the OpenAI-compatible API's engine room).

A request carries every token of its prompt (clients resend the whole history each call); the
model's prefix cache finds the longest prefix it already holds a state for, only the rest is read,
and the state at the end of the prompt is kept for the next request. `cached_tokens` in the usage
says how many prompt tokens were served from the cache.

Stop strings are cut at text level: text that could be the start of a stop string is held back
until it is clear, so a client never sees part of a stop string.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import torch

from ..engine import Engine, SamplingParams
from ..stops import first_stop, partial_stop
from .prefix_cache import PrefixCache
from .runner import Runner


class ServedModel(Protocol):
    """What a completion needs of a loaded model (models.LoadedModel is one)."""

    engine: Engine
    runner: Runner
    prefix_cache: PrefixCache
    tokenizer: Any


@dataclass(frozen=True)
class CompletionRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    namespace: str = ""  # prefix-cache namespace (session, API key or cache_salt); shared when sharing is on


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose state came from the prefix cache
    ttft_s: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class CompletionChunk:
    text: str  # new text since the previous chunk
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length on the last chunk
    usage: Usage | None = None  # on the last chunk


def complete(lm: ServedModel, req: CompletionRequest) -> Iterator[CompletionChunk]:
    """Stream the completion of req.prompt_ids; closing the iterator cancels the reply."""
    if not req.prompt_ids:
        raise ValueError("the prompt is empty")
    t0 = time.perf_counter()
    prompt = req.prompt_ids
    usage = Usage(prompt_tokens=len(prompt))
    cache, runner = lm.prefix_cache, lm.runner
    fresh = functools.partial(lm.engine.new_state, device=runner.state_device)  # made only on a miss
    start, state, node = cache.lookup(prompt[:-1], req.namespace, runner.state_device, fresh)  # a private copy
    usage.cached_tokens = start
    text, ids, finish = "", [], None
    with cache.pinned(node):  # the prefix this request resumes from stays while it runs
        if len(prompt) - 1 > start and not runner.one_call:
            state = runner.prefill(state, torch.tensor([prompt[start:len(prompt) - 1]]))
            cache.insert(prompt[:-1], state.clone(), req.namespace)  # the point before the reply
            start = len(prompt) - 1
        # the repetition penalty sees the whole prompt, cached part included (as the chat does)
        ctx = torch.tensor([prompt[:start]]) if req.sampling.repetition_penalty != 1.0 and start else None
        stream = runner.stream(state, torch.tensor([prompt[start:]]), req.sampling, req.max_new_tokens,
                               req.stop_token_ids, lm.tokenizer, ctx, prefix=(req.namespace, prompt[:start]))
        sent = 0
        try:
            for ev in stream:
                if not ids:
                    usage.ttft_s = time.perf_counter() - t0
                ids.append(ev.token_id)
                text += ev.text
                hit = first_stop(text, req.stop_strings)
                if hit >= 0:
                    text, finish = text[:hit], "stop"
                    break
                finish = ev.finish_reason
                upto = len(text) - (0 if finish else partial_stop(text, req.stop_strings))
                if upto > sent or finish:
                    yield CompletionChunk(text[sent:upto], [ev.token_id], None)
                    sent = upto
        finally:
            fed = ids + [ev.token_id for ev in stream.close()]  # a cancelled row may be a token ahead
            end = stream.state
            usage.cached_tokens = max(usage.cached_tokens, getattr(stream, "start", None) or 0)  # a replica's own
            if end is not None and end.seqlen == len(prompt) + len(fed):  # the state after prompt and reply:
                cache.insert(prompt + fed, end, req.namespace)  # a client that resends the history resumes here
    usage.completion_tokens = len(ids)
    yield CompletionChunk(text[sent:], [], "length" if finish == "length" else "stop", usage)
