"""A model replica: the models, their batching schedulers and prefix-state caches, one process.

It is the single-machine serving stack (ModelManager -> LoadedModel.runner, a BatchedRunner over
the Scheduler, and LoadedModel.prefix_cache) behind a Serve deployment. Each reply (`reply`)
starts from the best state the replica can get for the request's tokens, in this order:
  1. its own prefix cache (the conversation was here before: only the new tokens are read);
  2. the state the ingress kept, fetched from Ray's object store (the conversation's replica
     was lost or is full: the state moves once, ~152 KiB for the tiny model, 35 MiB for the 7B);
  3. the tokens themselves, read again by chunked prefill (nothing was kept anywhere).
All three give the same state (a state found by prefix equals reading those tokens), so the
reply is the one the conversation's first replica would have given.

Threads: Serve runs the `reply` coroutine on the replica's event loop; the reply itself (blocking
scheduler calls) runs in a thread of its own, handing items to the coroutine through an asyncio
queue. The coroutine sends what has arrived a few times a second per reply.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from typing import AsyncIterator, Callable, Mapping

import torch

from ..engine import State, StateError
from ..models import LoadedModel, ModelManager
from ..settings import Settings
from .protocol import (
    COPIED,
    NEW,
    OWN_CACHE,
    REBUILT,
    ModelInfo,
    ReplyEnd,
    ReplyRequest,
    ReplyStart,
    Token,
    checked_request,
)

STREAM_HZ = 20.0  # messages per second per reply, at most
_DONE = object()


class Cancelled(Exception):
    """The ingress went away (a stopped reply): stop reading between prompt pieces."""


def _resume(lm: LoadedModel, req: ReplyRequest, upto: int,
            fetch: Callable) -> tuple[int, State, object, str, int]:
    """(start, a private state holding req.tokens[:start] after whatever it held before, its cache
    node, source, bytes fetched). Without a prefix the sent state is all there is (start 0)."""
    runner, cache = lm.runner, lm.prefix_cache
    fresh = functools.partial(lm.engine.new_state, device=runner.state_device)  # made only on a miss
    if req.prefix is None:
        return (0, _fetched(lm, fetch(req.state), None), None, COPIED, 0) if req.state is not None else (
            0, fresh(), None, NEW, 0)
    held = len(req.prefix)
    n, state, node = cache.lookup(req.tokens[:upto], req.namespace, runner.state_device, fresh)
    if n >= held and n:
        return n, state, node, OWN_CACHE, 0
    if req.state is not None:
        state = _fetched(lm, fetch(req.state), held)
        return held, state, None, COPIED, state.nbytes
    return n, state, node, REBUILT if held else NEW, 0


def _fetched(lm: LoadedModel, sent: State, held: int | None) -> State:
    """The state the ingress kept, checked, on this replica's device in fresh aligned storage (so it
    continues bit for bit)."""
    if sent.signature != lm.engine.signature:
        raise StateError("the conversation's state belongs to another model")
    if held is not None and sent.seqlen != held:
        raise StateError(f"the state sent holds {sent.seqlen} tokens, not the {held} named")
    return sent.to(lm.runner.state_device).own()


def run_reply(lm: LoadedModel, req: ReplyRequest, replica: str, emit: Callable[[object], None],
              cancelled: threading.Event, fetch: Callable) -> None:
    """Serve one request on this replica's runner, emitting ReplyStart, Tokens and a ReplyEnd."""
    req = checked_request(req)
    tokens, cache, runner = req.tokens, lm.prefix_cache, lm.runner
    reading = req.max_new_tokens == 0
    upto = len(tokens) if reading else len(tokens) - 1  # a reply feeds the last token itself
    start, state, node, source, moved = _resume(lm, req, upto, fetch)
    before = state.seqlen  # tokens the state held before tokens[start:]
    emit(ReplyStart(replica, start, source, moved))
    cacheable = req.prefix is not None

    def check(done: int, total: int) -> None:
        if cancelled.is_set():
            raise Cancelled

    with cache.pinned(node):
        t0 = time.perf_counter()
        if upto > start:
            state = runner.prefill(state, torch.tensor([tokens[start:upto]]), check)
            if cacheable:
                cache.insert(tokens[:upto], state.clone(), req.namespace)
        if reading:
            emit(ReplyEnd(0, state.to("cpu")))
            return
        prefill_s = time.perf_counter() - t0
        context = torch.tensor([tokens[:upto]]) if req.sampling.repetition_penalty != 1.0 and upto else None
        stream = runner.stream(state, torch.tensor([tokens[upto:]]), req.sampling, req.max_new_tokens,
                               req.stop_token_ids, None, context)
        fed: list[int] = []
        try:
            for ev in stream:
                fed.append(ev.token_id)
                emit(Token(ev.token_id, ev.finish_reason, ev.metrics.batch_size, ev.metrics.batch_mean,
                           prefill_s + ev.metrics.prefill_s if ev.index == 0 else 0.0))
                if cancelled.is_set():
                    break
        finally:
            fed += [ev.token_id for ev in stream.close()]
        end = stream.state
        whole = end is not None and end.seqlen == before + len(tokens) - start + len(fed)
        if whole and cacheable:
            cache.insert(tokens + fed, end, req.namespace)  # the next turn resumes here
        give = whole and not cancelled.is_set() and end.nbytes <= req.copy_state_bytes
        emit(ReplyEnd(len(fed), end.to("cpu") if give else None))


class ModelReplica:
    """The Serve deployment of the models (fm_demo/cluster/app.py sets its resources and router)."""

    def __init__(self, env: Mapping[str, str], resolved: Mapping | None = None):
        from ray import serve

        self.settings = Settings.from_env(env, **(resolved or {}))
        if (threads := self.settings.torch_threads()) is not None:
            torch.set_num_threads(threads)
        self.manager = ModelManager(self.settings)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.manager.get(self.settings.default_preset)  # ready means the default model is loaded

    def resolved(self) -> dict:
        """What this replica made of `auto` (device, presets): the ingress follows it."""
        from .config import resolved_fields

        return resolved_fields(self.settings)

    async def describe(self, preset: str, precision: str | None) -> ModelInfo:
        """Load (preset, precision) here if needed; what the ingress needs to serve it."""
        lm = await asyncio.to_thread(self.manager.get, preset, precision)
        eng = lm.engine
        return ModelInfo(lm.key, lm.tokenizer, eng.config, lm.model.generation_config, eng.signature,
                         eng.dtype, eng.chunk_size, lm.nbytes, lm.load_s, lm.notes, eng.kernel_report(),
                         lm.device, self.replica)

    async def reply(self, req: ReplyRequest) -> AsyncIterator[list]:
        """Stream lists of ReplyStart / Token / ReplyEnd items for one request."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)

        def work() -> None:
            try:
                lm = self.manager.get(*req.key)
                run_reply(lm, req, self.replica, emit, cancelled, _fetch)
            except BaseException as e:  # handed to the coroutine, which raises it to the ingress
                emit(e)
            finally:
                emit(_DONE)

        threading.Thread(target=work, name=f"reply-{req.namespace[:12]}", daemon=True).start()
        try:
            async for batch in _batches(items, loop):
                yield batch
        finally:
            cancelled.set()  # the ingress stopped listening: the reply stops at its next token

    def stats(self) -> dict:
        """This replica's schedulers and prefix caches, per loaded model."""
        return {"replica": self.replica, "models": {
            f"{lm.key[0]} ({lm.key[1]})": {"scheduler": lm.runner.stats(),
                                           "prefix_cache": lm.prefix_cache.stats()}
            for lm in self.manager.loaded()}}


def _fetch(ref) -> State:
    import ray

    return ray.get(ref)


async def _batches(items: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> AsyncIterator[list]:
    """Group what the reply's thread emits into at most STREAM_HZ lists a second; raise its error."""
    gap, last = 1.0 / STREAM_HZ, 0.0
    while True:
        batch = [await items.get()]
        ending = batch[0] is _DONE or isinstance(batch[0], BaseException)
        if not ending and (wait := last + gap - loop.time()) > 0:
            await asyncio.sleep(wait)
        while not items.empty():
            batch.append(items.get_nowait())
        last = loop.time()
        out = [x for x in batch if x is not _DONE and not isinstance(x, BaseException)]
        if out:
            yield out
        error = next((x for x in batch if isinstance(x, BaseException)), None)
        if error is not None and not isinstance(error, Cancelled):
            raise error
        if any(x is _DONE for x in batch):
            return
