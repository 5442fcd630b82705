"""Stateless completions: a whole prompt in, a reply out (the OpenAI-compatible API's engine room).

A request carries every token of its prompt (clients resend the whole history each call). It is
one Request to the model's runner, which resumes from the longest prefix it holds a state for
(a turn end, a message boundary, a checkpoint inside a long prompt) and keeps states at the
message boundaries and after the reply, so a client that resends the history, or another
question about the same document or under the same system prompt, reads only what is new.
`cached_tokens` in the usage says how many prompt tokens were served from the cache.

Stop strings are cut at text level: text that could be the start of a stop string is held back
until it is clear, so a client never sees part of a stop string.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from ..engine import Engine, SamplingParams
from ..stops import first_stop, partial_stop
from .prefix_cache import PrefixCache
from .request import Request
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
    keep_at: tuple[int, ...] = ()  # message boundaries: states kept there serve other requests that share them


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
    usage = Usage(prompt_tokens=len(req.prompt_ids))
    reply = lm.runner.submit(Request(req.prompt_ids, req.namespace, req.sampling, req.max_new_tokens,
                                     req.stop_token_ids, req.keep_at, lm.tokenizer))
    text, sent, finish = "", 0, None
    try:
        for ev in reply.tokens():
            if not usage.completion_tokens:
                usage.ttft_s = time.perf_counter() - t0
            usage.completion_tokens += 1
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
        reply.close()
    usage.cached_tokens = reply.start
    yield CompletionChunk(text[sent:], [], "length" if finish == "length" else "stop", usage)
