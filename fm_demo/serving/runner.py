"""How a reply runs: the one seam between conversations and the device.

A conversation asks its model's runner to read tokens into a state (`prefill`) and to stream a
reply (`stream`); it never asks which kind of runner it has, only what the runner promises:

- BatchedRunner (a dedicated GPU or the CPU): every request goes through the model's Scheduler,
  which batches decode steps across all open chats; states stay on the model's device and are
  advanced in place.
- ZeroGpuRunner (a ZeroGPU Space): each reply is one `spaces.GPU` call in a worker process; the
  state lives on the CPU of the main process and the call returns the advanced state at its end
  (none when stopped), so the call reads its whole prompt itself (`one_call`).

A reply is a ReplyStream: iterate its TokenEvents; `close()` ends it and returns the events that
were already fed into the state but not taken (so the transcript can match the state); `state`
is the state after the reply (None when the runner cannot say, e.g. a stopped GPU call).

`stream(..., prefix=(namespace, tokens))` says what the state sent holds. A runner that keeps
states of its own (a cluster's model replica, fm_demo/cluster) may resume from a longer prefix
of those tokens it still has instead of the state sent; its stream then says so after the reply:
`start` (the position it resumed from) and `served_by` / `state_source` (for the readout).
The runners here have one state per reply and ignore `prefix`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import Tensor

from ..engine import Engine, SamplingParams, State, TokenEvent
from ..zerogpu import StateUpdate
from .scheduler import Progress, ReplyHandle, Scheduler

ProgressFn = Callable[[int, int], None]


class GpuCalls(Protocol):
    """The functions that run a model's work in ZeroGPU's worker (made by models.GpuCalls.make)."""

    stream: Callable[..., Iterator]  # (key, state, ids [1, T], **Engine.stream kwargs) -> events, StateUpdate
    prefill: Callable[..., State]  # (key, state, ids [1, T]) -> the advanced state


Key = Any  # a model's key, as the GPU worker's resolver knows it


class ReplyStream(Protocol):
    state: State | None

    def __iter__(self) -> Iterator[TokenEvent]: ...

    def close(self) -> list[TokenEvent]: ...


class Runner(Protocol):
    one_call: bool  # True: a reply reads its whole prompt in its own call, and only the end state returns
    state_device: torch.device | str  # where conversation states live between replies

    def prefill(self, state: State, ids: Tensor, progress: ProgressFn | None = None) -> State: ...

    def stream(self, state: State, ids: Tensor, sampling: SamplingParams, max_new_tokens: int,
               stop_token_ids: Iterable[int], tokenizer: object, context_ids: Tensor | None,
               prefix: tuple[str, list[int]] | None = None) -> ReplyStream: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


class _TokensOnly:
    """A ReplyHandle seen as a ReplyStream (prefill progress is not part of a reply)."""

    def __init__(self, handle: ReplyHandle):
        self._handle = handle
        self.state: State | None = handle.state

    def __iter__(self) -> Iterator[TokenEvent]:
        return (ev for ev in self._handle if not isinstance(ev, Progress))

    def close(self) -> list[TokenEvent]:
        return self._handle.close()


class BatchedRunner:
    one_call = False

    def __init__(self, engine: Engine, max_batch: int, prefill_budget: int, max_waiting: int, name: str = "model"):
        self.scheduler = Scheduler(engine, max_batch, prefill_budget, max_waiting, name)
        self.state_device = engine.device

    def prefill(self, state: State, ids: Tensor, progress: ProgressFn | None = None) -> State:
        return self.scheduler.prefill(state, ids, progress)

    def stream(self, state: State, ids: Tensor, sampling: SamplingParams, max_new_tokens: int,
               stop_token_ids: Iterable[int], tokenizer: object, context_ids: Tensor | None,
               prefix: tuple[str, list[int]] | None = None) -> ReplyStream:
        return _TokensOnly(self.scheduler.stream(state, ids, sampling, max_new_tokens, stop_token_ids,
                                                 tokenizer, context_ids))

    def stats(self) -> dict:
        return {"runner": "batched", **self.scheduler.stats()}

    def close(self) -> None:
        self.scheduler.close()


class _GpuReply:
    """A ZeroGPU reply: the call's token events; its closing StateUpdate becomes `state`.

    Until then `state` is the state sent: unchanged across a process boundary (its token count
    then tells the conversation it does not hold the reply), advanced in place where the call ran
    in this process.
    """

    def __init__(self, events: Iterator, sent: State):
        self._events = events
        self.state: State | None = sent

    def __iter__(self) -> Iterator[TokenEvent]:
        for item in self._events:
            if isinstance(item, StateUpdate):
                self.state = item.state.own()  # unpickled from the worker: give it storage of its own
            else:
                yield item

    def close(self) -> list[TokenEvent]:
        self._events.close()  # a stopped call sends no state back: the next reply re-reads
        return []


class ZeroGpuRunner:
    one_call = True
    state_device = "cpu"

    def __init__(self, gpu: GpuCalls, key: Key):
        self.gpu, self.key = gpu, key
        self._replies = 0

    def prefill(self, state: State, ids: Tensor, progress: ProgressFn | None = None) -> State:
        return self.gpu.prefill(self.key, state, ids).own()  # one GPU call; it cannot report progress

    def stream(self, state: State, ids: Tensor, sampling: SamplingParams, max_new_tokens: int,
               stop_token_ids: Iterable[int], tokenizer: object, context_ids: Tensor | None,
               prefix: tuple[str, list[int]] | None = None) -> ReplyStream:
        self._replies += 1
        events = self.gpu.stream(self.key, state, ids, sampling=sampling, max_new_tokens=max_new_tokens,
                                 stop_token_ids=stop_token_ids, context_ids=context_ids)
        return _GpuReply(iter(events), state)

    def stats(self) -> dict:
        return {"runner": "zerogpu (one GPU call per reply)", "replies": self._replies}

    def close(self) -> None:
        return None
