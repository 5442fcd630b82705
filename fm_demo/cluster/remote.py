"""The ingress side: models it does not hold, served through a Runner that calls the replicas.

RemoteModelManager is a ModelManager whose LoadedModels have the tokenizer and configs (from a
replica) but no weights, a RemoteRunner, and a prefix cache on the ingress's CPU. Conversations,
the session store and every UI handler and API run on them unchanged:

- A reply is one call (like ZeroGPU's): the runner finds the nearest state the ingress keeps for
  the request's tokens, names those tokens and the ones after them, and brings the state after
  the reply back (when it fits `copy_state_bytes`) into the ingress's prefix cache, beside the
  conversation's transcript, so a replica can be lost without losing anything.
- The request goes to the replica that holds the conversation's longest prefix (ReplicaIndex, a
  hint the AffinityRouter honours), where the state need not travel; the ingress's copy travels
  by reference and is fetched only by a replica that lacks it.
- A replica lost before or during a reply: the request is sent again, to another replica, with
  the tokens already streamed appended to the prompt. Greedy replies continue exactly; a sampled
  reply continues from the same tokens with a fresh draw.
- Text is decoded here, from token ids, so a reply resumed elsewhere reads on seamlessly.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Callable, Iterable, Iterator

import torch

from ..engine import Detokenizer, SamplingParams, State, StreamMetrics, TokenEvent
from ..engine.state import state_bytes, zero_state
from ..models import Key, LoadedModel, ModelLoadError, ModelManager
from ..serving import FRESH, GIVEN, HIT, Reply, Request, SchedulerBusy
from ..serving import REBUILT as START_REBUILT
from ..serving.prefix_cache import PrefixCache
from ..serving.request import refuse_beyond
from ..settings import Preset, Settings
from .placement import ReplicaIndex
from .protocol import COPIED, NEW, OWN_CACHE, REBUILT, ModelInfo, ReplyEnd, ReplyRequest, ReplyStart, Token

MAX_ATTEMPTS = 3  # a reply is sent to at most this many replicas before its error reaches the user


class ReplicaLost(SchedulerBusy):
    """Every replica tried for a reply was lost. Counts as busy: the UI shows its message, the
    OpenAI-compatible API answers 503 with Retry-After."""


def _lost_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

    return (ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError)


def _unwrap(e: BaseException) -> BaseException:
    """The error a replica raised (SchedulerBusy, ModelLoadError...), not Ray's wrapper of it."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _fmt_bytes(n: int) -> str:
    return f"{n / (1 << 20):,.2f} MiB" if n >= 1 << 20 else f"{n / 1024:,.0f} KiB"


class RemoteReply:
    """The token events of one or more replica calls (more when a replica is lost mid-reply).

    After iteration: `state` (the state after the reply, or None when it was not copied off),
    `start` (the position the serving replica resumed from), `served_by` and `state_source`.
    """

    def __init__(self, runner: RemoteRunner, req: ReplyRequest, tokenizer: object | None):
        self._runner, self._req = runner, req
        self._detok = Detokenizer(tokenizer) if tokenizer is not None else None
        self._emitted: list[int] = []
        self._gen = None
        self._closed = False
        self.state: State | None = None
        self.start: int | None = None
        self.served_by, self.state_source, self.lost = "", "", []
        self.moved_bytes = 0

    def __iter__(self) -> Iterator[TokenEvent]:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            req = self._attempt_request()
            if req is None:
                return
            self._gen = self._runner.open(req)
            try:
                for batch in self._gen:
                    for item in batch:
                        if (ev := self._take(item)) is not None:
                            yield ev
                return
            except _lost_errors() as e:
                if self._closed:
                    return
                self.lost.append(self.served_by.removeprefix("replica ") or "?")
                self._runner.count("replicas_lost")
                if attempt == MAX_ATTEMPTS:
                    raise ReplicaLost("The model replicas serving this reply were lost; try again in a "
                                      "moment.") from e
            except Exception as e:
                raise _unwrap(e) from None

    def _attempt_request(self) -> ReplyRequest | None:
        """The request itself, or after a lost replica: the same with the tokens already streamed
        appended to the prompt, for any replica (None: nothing is left to generate)."""
        req, done = self._req, self._emitted
        if not self.lost:
            return req
        if not req.max_new_tokens:  # a read: the same again, anywhere
            return replace(req, prefer=None)
        left = req.max_new_tokens - len(done)
        if left <= 0:
            return None
        return replace(req, ids=[*req.ids, *done], max_new_tokens=left, prefer=None)

    def _take(self, item: object) -> TokenEvent | None:
        if isinstance(item, ReplyStart):
            self._started(item)
        elif isinstance(item, Token):
            index = len(self._emitted)
            self._emitted.append(item.token_id)
            stop = item.token_id in self._req.stop_token_ids
            text = self._detok.push(item.token_id) if self._detok is not None and not stop else ""
            m = StreamMetrics(prefill_s=item.prefill_s, new_tokens=index + 1, batch_size=item.batch_size,
                              batch_mean=item.batch_mean)
            return TokenEvent(item.token_id, text, index, m, item.finish_reason)
        elif isinstance(item, ReplyEnd):
            self._ended(item)
        return None

    def _started(self, s: ReplyStart) -> None:
        req = self._req
        if req.prefix is not None:
            last = len(req.tokens) - (0 if req.max_new_tokens == 0 else 1)
            self.start = min(s.start, last) if self.start is None else min(self.start, s.start, last)
        self.served_by = f"replica {s.replica}"
        self.moved_bytes += s.moved_bytes
        after = f" (replica {', '.join(self.lost)} lost)" if self.lost else ""
        self.state_source = {
            OWN_CACHE: "its own state cache: only new tokens read",
            COPIED: f"state copied from the ingress, {_fmt_bytes(s.moved_bytes)}",
            REBUILT: f"rebuilt from the transcript, {len(req.tokens) - s.start:,} tokens read",
            NEW: f"read from the start, {len(req.tokens):,} tokens",
        }.get(s.source, s.source) + after
        self._runner.count(f"start_{s.source.replace(' ', '_')}")
        self._runner.count("moved_bytes", s.moved_bytes)

    def _ended(self, end: ReplyEnd) -> None:
        req = self._req
        replica = self.served_by.removeprefix("replica ")
        if req.prefix is not None:  # where the replica now keeps states: the next turn goes there
            tokens, index = req.tokens, self._runner.index
            if not req.max_new_tokens:
                index.record(req.namespace, tokens, replica)
            else:
                if not self.lost:
                    index.record(req.namespace, tokens[:-1], replica)
                index.record(req.namespace, tokens + self._emitted, replica)
        if end.state is not None:
            self.state = end.state.own()  # unpickled: storage of its own, so it continues bit for bit
            self._runner.count("copied_off_bytes", end.state.nbytes)

    def close(self) -> list[TokenEvent]:
        """Stop the reply; the replica's tokens beyond those taken are not in any state kept here."""
        self._closed = True
        if self._gen is not None:
            self._gen.cancel()
        return []


class RemoteRunner:
    """The Runner seam (serving/runner.py) for a model on the cluster's replicas."""

    state_device = "cpu"
    serves_options = serves_n = False

    def __init__(self, handle, key: Key, index: ReplicaIndex, copy_state_bytes: int, cache: PrefixCache,
                 new_state: Callable[[], State]):
        self.handle, self.key, self.index = handle, key, index
        self.cache, self.new_state = cache, new_state
        self._streaming = handle.options(stream=True)
        self.copy_state_bytes = copy_state_bytes
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def open(self, req: ReplyRequest):
        """Send `req` to a replica (the router honours req.prefer); its stream of item lists."""
        return self._streaming.reply.remote(req)

    def submit(self, req: Request) -> Reply:
        """Send the request to a replica with the nearest state the ingress keeps (by reference:
        fetched only by a replica without its own); keep the state that comes back."""
        refuse_beyond(req, "by a cluster (one reply per replica call)", options=False)
        self.count("replies")
        tokens = [int(t) for t in req.tokens]
        if not tokens:
            raise ValueError("the prompt is empty: nothing to read")
        limit = len(tokens) - 1 if req.max_new_tokens else len(tokens)
        start, state, node = 0, None, None
        if req.cache:
            start, state, node = self.cache.lookup(tokens[:limit], req.namespace, "cpu", lambda: None)
        if req.resume is not None and (state is None or req.resume_at > start):
            start, state, node = req.resume_at, req.resume, None
        sent = state if state is not None else self.new_state()
        prefix = (req.namespace, tokens[:start]) if req.cache else None
        remote = RemoteReply(self, self._request(sent, tokens[start:], req.sampling, req.max_new_tokens,
                                                 req.stop_token_ids, prefix), req.tokenizer)
        source = HIT if node is not None else (GIVEN if state is not None else FRESH)
        reply = Reply(req, start=start, source=source)
        if node is not None and (start in req.keep_at or start == limit):
            reply.kept[start] = node
        reply.admitted.set()
        reply._pull = self._pull(reply, remote, tokens)
        return reply

    def _pull(self, reply: Reply, remote: RemoteReply, tokens: list[int]) -> Iterator[TokenEvent]:
        req, reason = reply.request, "cancelled"
        try:
            for ev in remote:
                reply.fed.append(ev.token_id)
                reason = ev.finish_reason or reason
                reply.served_by = remote.served_by  # known while it streams (it changes if a replica is lost)
                yield ev
            reason = reason if req.max_new_tokens else "length"
        finally:
            if not reply.done.is_set():
                remote.close()
                reply.start = remote.start if remote.start is not None else reply.start
                if reply.start < req.expect:
                    reply.source = START_REBUILT
                reply.served_by, reply.state_source = remote.served_by, remote.state_source
                end = remote.state
                if req.cache and end is not None and end.seqlen == len(tokens) + len(reply.fed):
                    whole = [*tokens, *reply.fed]
                    reply.kept[len(whole)] = self.cache.insert(whole, end.clone(), req.namespace)
                reply.end_state = end
                reply._end(None, reason)

    def _request(self, state: State, new: list[int], sampling: SamplingParams, max_new: int,
                 stops: Iterable[int], prefix: tuple[str, list[int]] | None) -> ReplyRequest:
        import ray

        namespace, before = prefix if prefix is not None else ("", None)
        prefer = None
        if before is not None:
            _, prefer = self.index.find(namespace, [*before, *new[:-1]] if max_new else [*before, *new])
        ref = ray.put(state) if state.seqlen else None  # fetched only by a replica without its own copy
        return ReplyRequest(self.key, namespace, before, new, sampling, max_new, tuple(int(t) for t in stops),
                            ref, prefer, self.copy_state_bytes)  # a read (max_new 0) returns its state anyway

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def stats(self) -> dict:
        with self._lock:
            counts = dict(self._counts)
        return {"runner": "cluster (a model replica per reply, routed by prefix)",
                "index_entries": len(self.index), **counts}

    def close(self) -> None:
        return None


class RemoteModel:
    """A model as the ingress sees it: its configs. The weights are on the replicas."""

    def __init__(self, info: ModelInfo):
        self.config, self.generation_config = info.config, info.generation_config

    def __getattr__(self, name: str):
        raise _not_here(name)


class RemoteEngine:
    """The engine facts the ingress needs (state layout, signature); it runs no model."""

    device = torch.device("cpu")

    def __init__(self, info: ModelInfo):
        self.config, self.signature, self.dtype = info.config, info.signature, info.conv_dtype
        self.chunk_size, self.replica_device = info.chunk_size, info.device
        self._kernels = dict(info.kernels)

    def new_state(self, batch_size: int = 1, device: torch.device | str | None = None) -> State:
        """The empty state (sent as nothing: a replica starts from its own)."""
        return State(*zero_state(self.config, batch_size, self.dtype), self.signature)

    def state_nbytes(self, batch_size: int = 1) -> int:
        return state_bytes(self.config, self.dtype, torch.float32, batch_size)

    def kernel_report(self) -> dict[str, str]:
        reason = self._kernels.get("reason", "")
        return {**self._kernels, "reason": f"on the model replicas ({self.replica_device}): {reason}"}

    def __getattr__(self, name: str):
        raise _not_here(name)


def _not_here(name: str) -> BaseException:
    if name.startswith("__"):
        return AttributeError(name)
    return ModelLoadError("This needs the model in the app's own process, as the constant-memory lab does; "
                          "on a cluster the models run on the model replicas. Run `python app.py` for it.",
                          "incompatible")


class RemoteModelManager(ModelManager):
    """Models served by the cluster's replicas (`handle`: the model deployment's DeploymentHandle)."""

    def __init__(self, settings: Settings, handle, copy_state_bytes: int):
        super().__init__(settings)
        if not settings.served_models:  # the replicas hold the weights, not this process: all offered
            self.served = tuple(self._presets)
        self.handle, self.copy_state_bytes = handle, copy_state_bytes
        self.index = ReplicaIndex(shared=settings.share_prefix_cache)

    def _check_packages(self, precision: str) -> None:
        """The replicas load the weights: a missing 4-bit library is their error to report, not
        this process's."""

    def _load(self, preset: Preset, precision: str, progress) -> LoadedModel:
        t0 = time.perf_counter()
        progress(0.1, f"Loading {preset.label} on the model replicas")
        try:
            info: ModelInfo = self.handle.describe.remote(preset.key, precision).result()
        except Exception as e:
            cause = _unwrap(e)
            if isinstance(cause, ModelLoadError):
                raise ModelLoadError(str(cause), cause.reason) from None
            raise ModelLoadError(f"The model replicas could not load {preset.label}: {type(cause).__name__}: "
                                 f"{cause}", "error") from None
        key = (preset.key, precision)
        here = (f"runs on the cluster's model replicas ({info.device}); this process holds its tokenizer "
                "and the conversations' transcripts and states")
        notes = (*info.notes, here)
        cache = self.cache_pool.cache(self.settings.share_prefix_cache)
        engine = RemoteEngine(info)
        runner = RemoteRunner(self.handle, key, self.index, self.copy_state_bytes, cache, engine.new_state)
        lm = LoadedModel(key, preset, precision, RemoteModel(info), info.tokenizer, engine,
                         info.nbytes, time.perf_counter() - t0, notes, None, runner, cache)
        progress(1.0, f"{preset.label} ready on the model replicas")
        return lm
