"""Stateless completions: a whole prompt in, a reply out (the OpenAI-compatible API's engine room).

A request carries every token of its prompt (clients resend the whole history each call). It is
one Request to the model's runner, which resumes from the longest prefix it holds a state for
(a turn end, a message boundary, a checkpoint inside a long prompt) and keeps states at the
message boundaries and after the reply, so a client that resends the history, or another
question about the same document or under the same system prompt, reads only what is new.
`cached_tokens` in the usage says how many prompt tokens were served from the cache.

Stop strings are cut at text level: text that could be the start of a stop string is held back
until it is clear, so a client never sees part of a stop string.

n replies (CompletionRequest.n) come from one read of the prompt (the scheduler copies its state
into n rows); their chunks carry `index` and arrive interleaved as the rows produce them.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from ..engine import DecodeOptions, Engine, SamplingParams
from ..engine.decode import PLAIN
from ..stops import first_stop, partial_stop
from .prefix_cache import PrefixCache
from .request import Reply, Request
from .runner import Runner

TokenLogprob = tuple[int, float, tuple[tuple[int, float], ...]]  # (token id, log-probability, alternatives)


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
    namespace: str = ""  # prefix-cache namespace (an API client: namespaces.py); shared when sharing is on
    keep_at: tuple[int, ...] = ()  # message boundaries: states kept there serve other requests that share them
    options: DecodeOptions = PLAIN
    n: int = 1
    prompt_logprobs: int | None = None  # echo with logprobs: score every prompt token


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
    usage: Usage | None = None  # on the last chunk: this choice's tokens (the prompt counted once)
    index: int = 0  # which of the n replies
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens since the previous chunk
    prompt_logprobs: list | None = None  # on each reply's first chunk, when asked (Reply.prompt_logprobs)


def complete(lm: ServedModel, req: CompletionRequest) -> Iterator[CompletionChunk]:
    """Stream the completion of req.prompt_ids; closing the iterator cancels the reply (all n)."""
    if not req.prompt_ids:
        raise ValueError("the prompt is empty")
    t0 = time.perf_counter()
    reply = lm.runner.submit(Request(req.prompt_ids, req.namespace, req.sampling, req.max_new_tokens,
                                     req.stop_token_ids, req.keep_at, lm.tokenizer, options=req.options,
                                     n=req.n, prompt_logprobs=req.prompt_logprobs))
    replies = [reply, *reply.siblings]
    streams = [_choice(r, req, i, t0) for i, r in enumerate(replies)]
    try:
        if len(streams) == 1:
            yield from streams[0]
        else:
            yield from _interleaved(streams)
    finally:
        for r in replies:
            r.close()


def _choice(reply: Reply, req: CompletionRequest, index: int, t0: float) -> Iterator[CompletionChunk]:
    usage = Usage(prompt_tokens=len(req.prompt_ids))
    text, sent, finish, pending, scanned = "", 0, None, [], 0
    prompt = None if req.prompt_logprobs is None else reply.prompt_logprobs
    try:
        for ev in reply.tokens():
            if not usage.completion_tokens:
                usage.ttft_s = time.perf_counter() - t0
            usage.completion_tokens += 1
            text += ev.text
            hit = first_stop(text, req.stop_strings, scanned)
            scanned = len(text)
            if hit >= 0:
                text, finish = text[:hit], "stop"
                break
            if ev.logprob is not None:
                pending.append((ev.token_id, ev.logprob, ev.top_logprobs))
            finish = ev.finish_reason
            upto = len(text) - (0 if finish else partial_stop(text, req.stop_strings))
            if upto > sent or finish:
                yield CompletionChunk(text[sent:upto], [ev.token_id], None, None, index, pending, prompt)
                sent, pending, prompt = upto, [], None
    finally:
        reply.close()
    usage.cached_tokens = reply.start
    reason = "length" if finish == "length" or (finish is None and not req.max_new_tokens) else "stop"
    yield CompletionChunk(text[sent:], [], reason, usage, index, pending,
                          reply.prompt_logprobs if prompt is not None else None)


def _interleaved(streams: list[Iterator[CompletionChunk]]) -> Iterator[CompletionChunk]:
    """The chunks of several choices in the order they come (a thread drains each); an error in
    one ends the whole completion, as it would for one choice."""
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    done = object()

    def drain(stream: Iterator[CompletionChunk]) -> None:
        try:
            for chunk in stream:
                out.put(chunk)
                if stop.is_set():
                    break
        except BaseException as e:  # handed to the consumer, who raises it
            out.put(e)
        finally:
            stream.close()
            out.put(done)

    threads = [threading.Thread(target=drain, args=(s,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    try:
        left = len(threads)
        while left:
            item = out.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()
