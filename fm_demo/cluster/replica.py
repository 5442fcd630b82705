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
import threading
from typing import AsyncIterator, Callable, Mapping

import torch

from ..engine import State, StateError
from ..models import LoadedModel, ModelManager
from ..serving import Progress, Request
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


def _resume(lm: LoadedModel, req: ReplyRequest, upto: int, fetch: Callable) -> tuple[State | None, str, int]:
    """(a state the ingress sent, to resume from when this replica's cache holds less; where the
    start comes from; bytes fetched). The scheduler finds this replica's own prefix itself."""
    if req.prefix is None:  # no cache: the sent state is all there is
        return (_fetched(lm, fetch(req.state), None), COPIED, 0) if req.state is not None else (None, NEW, 0)
    held = len(req.prefix)
    n, _ = lm.prefix_cache.find(req.tokens[:upto], req.namespace)
    if n >= held and n:
        return None, OWN_CACHE, 0
    if req.state is not None:
        state = _fetched(lm, fetch(req.state), held)
        return state, COPIED, state.nbytes
    return None, REBUILT if held else NEW, 0


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
    cacheable = req.prefix is not None
    tokens = req.tokens if cacheable else req.ids
    upto = len(tokens) - (1 if req.max_new_tokens else 0)  # a reply feeds the last token itself
    state, source, moved = _resume(lm, req, upto, fetch)
    resume_at = len(req.prefix or ()) if state is not None and cacheable else 0
    reply = lm.runner.submit(Request(tokens, req.namespace, req.sampling, req.max_new_tokens,
                                     req.stop_token_ids, progress=True, cache=cacheable, resume=state,
                                     resume_at=resume_at))
    try:
        reply.admitted.wait()
        emit(ReplyStart(replica, reply.start if cacheable else 0, source, moved))
        prefill_s = 0.0
        for item in reply:
            if cancelled.is_set():
                break
            if isinstance(item, Progress):
                continue
            emit(Token(item.token_id, item.finish_reason, item.metrics.batch_size, item.metrics.batch_mean,
                       item.metrics.prefill_s if item.index == 0 else prefill_s))
    finally:
        reply.close()
    end = reply.end_state
    if not req.max_new_tokens:
        emit(ReplyEnd(0, end.to("cpu") if end is not None and not cancelled.is_set() else None))
        return
    give = end is not None and not cancelled.is_set() and end.nbytes <= req.copy_state_bytes
    emit(ReplyEnd(len(reply.fed), end.to("cpu") if give else None))


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
        if error is not None:
            raise error
        if any(x is _DONE for x in batch):
            return
