"""How a request runs: the one seam between its callers (conversations, /v1, a cluster replica)
and the device. Every runner takes a Request (request.py: the whole prompt, its namespace, where
to keep states) and returns a Reply with the same declared fields:

- BatchedRunner (a dedicated GPU or the CPU): the model's Scheduler, which owns the request from
  admission (prefix lookup) to finish (the end state kept), batching decode steps across rows.
- ZeroGpuRunner (a ZeroGPU Space): the main process has no GPU, so the prefix lookup and the
  keeping of the end state happen here, around one `spaces.GPU` call that reads the rest of the
  prompt and streams the reply in a worker process (Engine.stream: the same DecodeRow as the
  scheduler's). A stopped call sends no state back; the next request reads from the nearest one.

A cluster's ingress has a third (fm_demo/cluster/remote.py: the replicas run a BatchedRunner).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Protocol

import torch

from ..engine import Engine, State, TokenEvent
from ..zerogpu import StateUpdate
from .prefix_cache import PrefixCache
from .request import FRESH, HIT, REBUILT, Reply, Request, refuse_beyond
from .scheduler import Scheduler

ProgressFn = Callable[[int, int], None]


class GpuCalls(Protocol):
    """The functions that run a model's work in ZeroGPU's worker (made by models.GpuCalls.make)."""

    stream: Callable[..., Iterator]  # (key, state, ids [1, T], **Engine.stream kwargs) -> events, StateUpdate
    prefill: Callable[..., State]  # (key, state, ids [1, T]) -> the advanced state


Key = Any  # a model's key, as the GPU worker's resolver knows it


class Runner(Protocol):
    state_device: torch.device | str  # where states live between requests
    serves_options: bool  # DecodeOptions (log-probabilities, bias, penalties, grammar) are applied
    serves_n: bool  # Request.n > 1: n rows from one read

    def submit(self, req: Request) -> Reply: ...

    def stats(self) -> dict: ...

    def in_use(self) -> int: ...  # requests running or waiting now: the model has users

    def close_if_idle(self) -> bool: ...  # close only when in_use() is 0, atomically; True if closed

    def close(self) -> None: ...


class BatchedRunner:
    serves_options = serves_n = True

    def __init__(self, engine: Engine, max_batch: int, prefill_budget: int, max_waiting: int,
                 name: str = "model", cache: PrefixCache | None = None, checkpoint_tokens: int = 1024):
        self.scheduler = Scheduler(engine, max_batch, prefill_budget, max_waiting, name, cache,
                                   checkpoint_tokens)
        self.state_device = engine.device

    def submit(self, req: Request) -> Reply:
        return self.scheduler.submit(req)

    def stats(self) -> dict:
        return {"runner": "batched", **self.scheduler.stats()}

    def in_use(self) -> int:
        return self.scheduler.in_use()

    def close_if_idle(self) -> bool:
        return self.scheduler.close_if_idle()

    def close(self) -> None:
        self.scheduler.close()


class ZeroGpuRunner:
    state_device = "cpu"
    serves_options, serves_n = True, False

    def __init__(self, gpu: GpuCalls, key: Key, cache: PrefixCache, new_state: Callable[[], State]):
        self.gpu, self.key, self.cache, self.new_state = gpu, key, cache, new_state
        self._replies = 0

    def submit(self, req: Request) -> Reply:
        """Find the nearest state here, run the rest in one GPU call, keep what comes back."""
        refuse_beyond(req, "on ZeroGPU (one GPU call per reply)", options=True)
        self._replies += 1
        tokens = [int(t) for t in req.tokens]
        if not tokens:
            raise ValueError("the prompt is empty: nothing to read")
        limit = len(tokens) - 1 if req.max_new_tokens else len(tokens)
        start, state, node = (self.cache.lookup(tokens[:limit], req.namespace, "cpu", lambda: None)
                              if req.cache else (0, None, None))
        source = HIT if node is not None else FRESH
        if req.resume is not None and (state is None or req.resume_at > start):
            start, state, source = req.resume_at, req.resume, "given"
        if state is None:
            state = self.new_state()
        reply = Reply(req, start=start, source=REBUILT if start < req.expect else source)
        reply.metrics.prompt_tokens = len(tokens) - start
        if node is not None and (start in req.keep_at or start == limit):
            reply.kept[start] = node
        reply.admitted.set()
        reply._pull = self._call(reply, tokens, start, state)
        return reply

    def _call(self, reply: Reply, tokens: list[int], start: int, state: State) -> Iterator[TokenEvent]:
        req = reply.request
        ids = torch.tensor([tokens[start:]])  # [1, T]
        if not req.max_new_tokens:
            t0 = time.perf_counter()
            end = self.gpu.prefill(self.key, state, ids).own() if start < len(tokens) else state
            reply.metrics.prefill_s = time.perf_counter() - t0
            self._finish(reply, tokens, end, "length")
            return
        context = torch.tensor([[*req.context, *tokens[:start]]]) if req.context or start else None
        events = self.gpu.stream(self.key, state, ids, sampling=req.sampling,
                                 max_new_tokens=req.max_new_tokens, stop_token_ids=req.stop_token_ids,
                                 context_ids=context, options=req.options)
        reason = "cancelled"
        try:
            for item in events:
                if isinstance(item, StateUpdate):  # unpickled from the worker: storage of its own
                    self._finish(reply, tokens, item.state.own(), reason)
                    return
                reply.fed.append(item.token_id)
                reason = item.finish_reason or reason
                yield item
        finally:
            events.close()  # a stopped call sends no state back: the next request reads again
            if not reply.done.is_set():
                reply._end(None, reason)

    def _finish(self, reply: Reply, tokens: list[int], end: State, reason: str) -> None:
        req = reply.request
        if req.cache:
            whole = [*tokens, *reply.fed]
            reply.kept[len(whole)] = self.cache.insert(whole, end.clone(), req.namespace)
        reply.end_state = end
        reply._end(None, reason)

    def stats(self) -> dict:
        return {"runner": "zerogpu (one GPU call per reply)", "replies": self._replies}

    def in_use(self) -> int:
        """Not tracked: on ZeroGPU a model is never unloaded (ModelManager refuses a load first)."""
        return 0

    def close_if_idle(self) -> bool:
        return True

    def close(self) -> None:
        return None
