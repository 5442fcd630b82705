"""Continuous batching of recurrent states: one scheduler per loaded model owns its device.

Each iteration of the scheduler's thread
  (a) admits waiting requests, up to `max_batch` rows,
  (b) reads prompt pieces within a token budget (chunked prefill interleaved with decode, so a long
      document read does not stall other users' streams),
  (c) runs one batched decode step over every decoding row,
  (d) hands each row's token to its caller.
Rows join and leave between steps (finished, stop token, cancelled, caller gone).

Falcon Mamba's state has the same size for every sequence, so a decoding row is a fixed slot in
two buffers, conv [L, S, D, K-1] and ssm [L, S, D, N] (S = max_batch): no paging, no fragmentation.
The decoding rows are slots 0..n-1; a leaving row's slot is filled by the last row (one row copy).
A row's state is copied into its slot when its prompt has been read and back into the caller's
State when it leaves, so the caller sees exactly what Engine.stream would have left there: the
prompt plus every token handed out.

Exactness: prompts are read by the engine's batch-1 prefill in pieces cut at the same offsets
whatever else runs (multiples of `piece` from the request's start), so the read is the same as
alone. Decode steps run in the batch: the per-row math (conv, scan, norms, sampling with the
row's own generator) never mixes rows, but a matmul's kernel can change with the number of rows
(MKL takes a GEMV path for one row), so logits may differ from the solo ones in the last bits:
greedy tokens agree and states agree to fp32 rounding (tests check both).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from ..engine import Engine, SamplingParams, State, StreamMetrics, TokenEvent
from ..engine.engine import _Detok
from ..engine.sampling import make_generator, sample

log = logging.getLogger("fm_demo.scheduler")
RATE_WINDOW_S = 5.0  # aggregate tok/s is measured over this trailing window


class SchedulerBusy(RuntimeError):
    """Every row and every waiting place is taken; the message is for the user."""


class SchedulerClosed(RuntimeError):
    """The model this scheduler served was unloaded."""


@dataclass
class Progress:
    """Prompt tokens read so far (done of total), after each piece."""

    done: int
    total: int


@dataclass(eq=False)  # compared by identity: rows are found in lists by `in` / remove()
class _Request:
    state: State  # [L, 1, D, ...] on the engine's device: advanced in place
    ids: Tensor  # [T] prompt tokens to read
    sampling: SamplingParams
    max_new_tokens: int  # 0: read the prompt only
    stops: frozenset[int]
    detok: _Detok | None
    seen: Tensor | None  # [1, S] context for the repetition penalty, None when it is off
    report_progress: bool
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    # scheduler-side progress
    read: int = 0
    slot: int = -1  # decode slot, -1 while reading the prompt
    pending: int = -1  # sampled token not yet fed
    emitted: int = 0
    gen: torch.Generator | None = None
    metrics: StreamMetrics = field(default_factory=StreamMetrics)
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float = 0.0
    batch_sum: int = 0


_END = object()


class ReplyHandle:
    """What the caller iterates: Progress while the prompt is read, then TokenEvents.

    `close()` (or leaving a for-loop early and closing) cancels the row; it returns once the
    scheduler has let go of the state, with the tokens already fed into the state that the
    caller had not taken yet, so the caller can keep state and transcript in step.
    """

    def __init__(self, scheduler: Scheduler, req: _Request):
        self._sched, self._req, self._finished = scheduler, req, False

    @property
    def state(self) -> State:
        return self._req.state

    def __iter__(self) -> Iterator[Progress | TokenEvent]:
        return self

    def __next__(self) -> Progress | TokenEvent:
        if self._finished:
            raise StopIteration
        item = self._req.out.get()
        if item is _END:
            self._finished = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return item

    def close(self) -> list[TokenEvent]:
        """Cancel (if still running) and return the token events fed but not taken."""
        if not self._finished:
            self._sched._cancel(self._req)
        self._finished = True
        rest = []
        while True:
            try:
                item = self._req.out.get_nowait()
            except queue.Empty:
                return rest
            if isinstance(item, TokenEvent):
                rest.append(item)


class Scheduler:
    """Serves every reply and prompt read of one engine, batching decode steps across rows."""

    def __init__(self, engine: Engine, max_batch: int = 16, prefill_budget: int = 256, max_waiting: int = 16,
                 name: str = "model"):
        if max_batch < 1 or prefill_budget < 1 or max_waiting < 0:
            raise ValueError("max_batch and prefill_budget must be >= 1, max_waiting >= 0")
        self.engine, self.max_batch, self.max_waiting = engine, max_batch, max_waiting
        self.prefill_budget = prefill_budget
        self.piece = min(engine.chunk_size, prefill_budget)  # prompt pieces: same cuts whatever runs
        cfg = engine.config
        L, D = cfg.num_hidden_layers, cfg.intermediate_size
        dev = engine.device
        slots = engine.decode_bucket(max_batch)
        self.conv = torch.zeros(L, slots, D, cfg.conv_kernel - 1, device=dev, dtype=engine.dtype)  # [L, S, D, K-1]
        self.ssm = torch.zeros(L, slots, D, cfg.state_size, device=dev, dtype=torch.float32)  # [L, S, D, N]
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._reading: list[_Request] = []  # admitted, prompt not read yet
        self._decoding: list[_Request] = []  # in slot order
        self._closed = False
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)
        self._counts = dict(steps=0, tokens=0, prefill_tokens=0, busy_refusals=0, errors=0, last_batch=0)
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{name}", daemon=True)
        self._thread.start()

    # -- callers -------------------------------------------------------------------------------
    def prefill(self, state: State, ids: Tensor, progress: Callable[[int, int], None] | None = None) -> State:
        """Read ids [1, T] into `state` (in place) through the scheduler, in budgeted pieces.

        progress(done, total) runs in the caller's thread after each piece; an exception it raises
        stops the read between pieces (the state then holds a prefix: the caller discards it).
        """
        handle = self.submit(state, ids, max_new_tokens=0, report_progress=progress is not None)
        try:
            for item in handle:
                if progress is not None and isinstance(item, Progress):
                    progress(item.done, item.total)
        finally:
            handle.close()
        return state

    def stream(self, state: State, ids: Tensor, sampling: SamplingParams | None = None,
               max_new_tokens: int = 256, stop_token_ids: Iterable[int] = (), tokenizer: object | None = None,
               context_ids: Tensor | None = None, report_progress: bool = False) -> ReplyHandle:
        """Like Engine.stream, batched with every other row: read ids [1, T], then sample."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return self.submit(state, ids, sampling, max_new_tokens, stop_token_ids, tokenizer, context_ids,
                           report_progress)

    def submit(self, state: State, ids: Tensor, sampling: SamplingParams | None = None, max_new_tokens: int = 0,
               stop_token_ids: Iterable[int] = (), tokenizer: object | None = None,
               context_ids: Tensor | None = None, report_progress: bool = False) -> ReplyHandle:
        eng = self.engine
        ids = eng._check_ids(ids, 2)
        eng._check_state(state, 1)
        if ids.shape[0] != 1:
            raise ValueError("a request reads one sequence (batch size 1)")
        sampling = sampling or SamplingParams()
        seen = None
        if sampling.repetition_penalty != 1.0:
            ctx = [ids] if context_ids is None else [context_ids.to(eng.device, torch.long), ids]
            seen = torch.cat(ctx, dim=1)
        req = _Request(state, ids[0], sampling, max_new_tokens, frozenset(int(t) for t in stop_token_ids),
                       _Detok(tokenizer) if tokenizer is not None else None, seen, report_progress)
        req.metrics.prompt_tokens = int(ids.shape[1])
        with self._cond:
            if self._closed:
                raise SchedulerClosed("this model was unloaded; select it again to continue")
            if self._rows() + len(self._waiting) >= self.max_batch + self.max_waiting:
                self._counts["busy_refusals"] += 1
                raise SchedulerBusy(f"The server is busy: {self._rows()} replies are running and "
                                    f"{len(self._waiting)} are waiting. Try again in a moment.")
            self._waiting.append(req)
            self._cond.notify()
        return ReplyHandle(self, req)

    def _cancel(self, req: _Request) -> None:
        with self._cond:
            req.cancelled = True
            if req in self._waiting:
                self._waiting.remove(req)
                req.done.set()
            self._cond.notify()
        req.done.wait()

    def close(self) -> None:
        """Stop the thread; requests still running or waiting end with SchedulerClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- figures -------------------------------------------------------------------------------
    def _rows(self) -> int:
        return len(self._reading) + len(self._decoding)

    def stats(self) -> dict:
        with self._cond:
            now = time.perf_counter()
            recent = [(t, n) for t, n in self._recent if now - t <= RATE_WINDOW_S]
            tokens = sum(n for _, n in recent)
            span = max(now - recent[0][0], 1e-3) if recent else 0.0
            per_row = self.engine.state_nbytes()
            return {
                "active_rows": self._rows(), "decoding": len(self._decoding), "reading": len(self._reading),
                "waiting": len(self._waiting), "max_batch": self.max_batch, "max_waiting": self.max_waiting,
                "prefill_budget": self.prefill_budget, "agg_tok_s": tokens / span if span else 0.0,
                "state_bytes_active": per_row * self._rows(), "slot_buffer_bytes": per_row * self.conv.shape[1],
                **self._counts,
            }

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._waiting or self._reading or self._decoding):
                    self._cond.wait()
                if self._closed:
                    break
                self._drop_cancelled()
                while self._waiting and self._rows() < self.max_batch:
                    self._reading.append(self._waiting.popleft())
            try:
                self._iteration()
            except Exception as e:  # a bug or a device error: fail the rows it touched, keep serving
                log.exception("scheduler iteration failed")
                self._counts["errors"] += 1
                with self._cond:
                    for req in [*self._reading, *self._decoding]:
                        self._finish(req, e, keep_state=False)
        with self._cond:
            for req in [*self._waiting, *self._reading, *self._decoding]:
                self._finish(req, SchedulerClosed("this model was unloaded; select it again to continue"),
                             keep_state=False)
            self._waiting.clear()

    @torch.inference_mode()
    def _iteration(self) -> None:
        self._read_prompts()
        if self._decoding:
            self._decode_step()

    def _drop_cancelled(self) -> None:
        for req in [r for r in [*self._reading, *self._decoding] if r.cancelled]:
            self._finish(req, None, keep_state=True)

    def _read_prompts(self) -> None:
        """Read prompt pieces: within the budget, first come first served, while rows decode; up to
        a chunk per row otherwise (so a new arrival still starts within one chunk's time)."""
        decoding = bool(self._decoding)
        per_row = max(self.engine.chunk_size, self.piece)
        budget = self.prefill_budget if decoding else len(self._reading) * per_row
        for req in list(self._reading):
            row_budget = budget if decoding else per_row
            while row_budget > 0 and req.read < len(req.ids):
                t0 = time.perf_counter()
                end = min(req.read + self.piece, len(req.ids))
                logits = self.engine.prefill(req.ids[req.read:end].view(1, -1), req.state)
                n, req.read = end - req.read, end
                budget, row_budget = budget - n, row_budget - n
                req.metrics.prefill_s += time.perf_counter() - t0
                self._counts["prefill_tokens"] += n
                if req.report_progress:
                    req.out.put(Progress(req.read, len(req.ids)))
                if req.read == len(req.ids):
                    self._prompt_read(req, logits)
                    break
                if req.cancelled:
                    break
            if budget <= 0:
                break

    def _prompt_read(self, req: _Request, logits: Tensor) -> None:
        with self._cond:
            self._reading.remove(req)
            if req.max_new_tokens == 0 or req.cancelled:
                self._finish(req, None, keep_state=True)
                return
            req.gen = make_generator(req.sampling, self.engine.device)
            req.pending = self._sample(req, logits)
            req.slot = len(self._decoding)
            self.conv[:, req.slot].copy_(req.state.conv[:, 0])
            self.ssm[:, req.slot].copy_(req.state.ssm[:, 0])
            self._decoding.append(req)

    def _sample(self, req: _Request, logits: Tensor) -> int:
        """The row's next token from its logits [1, V], with its own settings and generator."""
        tok = sample(logits, req.sampling, req.gen, req.seen)
        if req.seen is not None:
            req.seen = torch.cat([req.seen, tok.view(1, 1)], dim=1)
        return int(tok)

    def _decode_step(self) -> None:
        rows = list(self._decoding)
        n = len(rows)
        b = self.engine.decode_bucket(n)  # n on CPU; a captured CUDA-graph size on CUDA (spare slots pad)
        ids = torch.tensor([r.pending for r in rows] + [0] * (b - n), device=self.engine.device)
        logits = self.engine.decode_step(ids, self.conv[:, :b], self.ssm[:, :b], static=True)[:n]  # [n, V]
        now = time.perf_counter()
        self._counts["steps"] += 1
        self._counts["tokens"] += n
        self._counts["last_batch"] = n
        with self._cond:
            self._recent.append((now, n))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()
        finished = []
        for i, req in enumerate(rows):
            tid, index = req.pending, req.emitted
            m = req.metrics
            if index == 0:
                req.t_first = now
                m.ttft_s = now - req.t_submit
            req.emitted += 1
            req.batch_sum += n
            m.new_tokens, m.decode_s, m.batch_size = req.emitted, now - req.t_first, n
            m.batch_mean = req.batch_sum / req.emitted
            finish = "stop" if tid in req.stops else ("length" if req.emitted == req.max_new_tokens else None)
            text = req.detok.push(tid) if req.detok is not None and tid not in req.stops else ""
            if finish:
                finished.append((req, TokenEvent(tid, text, index, m, finish)))
                continue
            req.out.put(TokenEvent(tid, text, index, m, None))
            req.pending = self._sample(req, logits[i:i + 1])
        with self._cond:
            for req, event in finished:
                self._finish(req, event, keep_state=True)

    def _finish(self, req: _Request, last: TokenEvent | BaseException | None, keep_state: bool) -> None:
        """Take `req` out (lock held): its state back from its slot, its last item, then the end."""
        if req in self._reading:
            self._reading.remove(req)
        if req in self._decoding:
            slot, last_row = req.slot, len(self._decoding) - 1
            if keep_state:
                req.state.conv[:, 0].copy_(self.conv[:, slot])
                req.state.ssm[:, 0].copy_(self.ssm[:, slot])
                req.state.seqlen += req.emitted  # every token handed out was fed in the slot
            if slot != last_row:  # the last row moves into the freed slot
                moved = self._decoding[last_row]
                self.conv[:, slot].copy_(self.conv[:, last_row])
                self.ssm[:, slot].copy_(self.ssm[:, last_row])
                moved.slot = slot
                self._decoding[slot] = moved
            self._decoding.pop()
            req.slot = -1
        if last is not None:
            req.out.put(last)
        if not isinstance(last, BaseException):
            req.out.put(_END)
        req.done.set()
