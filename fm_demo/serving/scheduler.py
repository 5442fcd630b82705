"""Continuous batching of recurrent states: one scheduler per loaded model owns its device and
every request to it, from admission to finish.

A request (request.py) names its whole prompt. The scheduler thread, each iteration:
  1. ends cancelled rows, and admits waiting requests up to `max_batch` rows. Admission finds the
     longest prefix of the prompt whose state the prefix cache holds (or takes the state the
     caller handed in, when that holds more) and copies it: the row reads only the rest;
  2. plans the iteration (plan.py): prompt tokens per reading row, shortest-remaining-first
     within the budget while rows decode (a short prompt is not stuck behind a long read);
  3. reads those pieces, keeping a state in the prefix cache at the positions the caller asked
     for (turn and message boundaries), every `checkpoint_tokens` tokens and `tail_tokens` before
     the end of a long prompt (so a request that diverges anywhere resumes within that many
     tokens), and just before the last prompt token of a reply (retry reads one token);
  4. runs one batched decode step over every decoding row (those whose prompt was read in step 3
     included): each row samples with its own settings and generator (engine/decode.py);
  5. ends finished rows and keeps the state after prompt and reply in the cache.
Checkpoints are evicted before the states callers asked for (prefix_cache.py).

n replies to one prompt (Request.n): one row reads the prompt; when it is read, its state is
copied into the n - 1 other rows (followers, admitted with it: admission counts all n), and all
n sample their first tokens from the same logits with their own generators (a seeded request's
reply i uses seed + i), then decode in the batch like any rows.

Prompt log-probabilities (Request.prompt_logprobs): the row reads its prompt from the start (the
prefix cache keeps states, not logits, so a cached prefix's positions are computed again), each
piece with every position's logits, reduced at once to the log-probability of the token that
follows and its alternatives: memory stays that of one piece, whatever the prompt's length.

Fault isolation: each row's admission, reading, sampling, detokenizing and cache keeping run
under their own guard. A failure there ends that row alone with RequestFailed; every other row
goes on as it would have. Only a failure of the batched model step itself (a device error: it
cannot be pinned on a row) ends the rows in that step. Every submitted request ends exactly once.

Slots: Falcon Mamba's state has the same size for every sequence, so a decoding row is a fixed
slot in two buffers, conv [L, S, D, K-1] and ssm [L, S, D, N] (S = max_batch): no paging, no
fragmentation. The decoding rows are slots 0..n-1; a leaving row's slot is filled by the last row.

Exactness: a prompt is cut into pieces at fixed offsets from where its reading started
(multiples of `piece`) and at its keep positions, whatever else runs (plan.py never splits a
piece), so the read is the same as alone. Decode steps run in the batch: per-row math never mixes
rows, but a matmul's kernel can change with the number of rows (MKL takes a GEMV path for one
row), so logits may differ from the solo ones in the last bits: greedy tokens agree and states
agree to fp32 rounding (tests check both).

Locks: `_cond` guards the three row lists, the slot table and the counters callers also write
(busy refusals, cancellations); everything else a row holds, the slot buffers and the other
counters are the scheduler thread's alone (callers set `cancelled` under `_cond`). The prefix
cache has its own lock (prefix_cache.py).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from ..engine import DecodeRow, Engine, SamplingParams, State, StreamMetrics, TokenEvent
from ..engine.decode import MAX_TOP_LOGPROBS
from ..engine.state import zero_state
from .plan import plan
from .prefix_cache import PrefixCache
from .request import (FRESH, GIVEN, HIT, REBUILT, Progress, Reply, Request, RequestFailed, RequestRefused,
                      SchedulerBusy, SchedulerClosed)

log = logging.getLogger("fm_demo.scheduler")
RATE_WINDOW_S = 5.0  # aggregate tok/s is measured over this trailing window
TAIL_TOKENS = 256  # a long prompt keeps a checkpoint this many tokens before its end


@dataclass(eq=False)  # compared by identity: rows are found in lists by `in` / remove()
class _Row:
    req: Request
    reply: Reply
    tokens: list[int]
    piece: int
    t_submit: float = field(default_factory=time.perf_counter)
    state: State | None = None
    start: int = 0
    read: int = 0
    marks: dict[int, bool] = field(default_factory=dict)  # position -> keep (True) or checkpoint (False)
    decoder: DecodeRow | None = None
    slot: int = -1  # decode slot, -1 while reading
    pending: int = -1  # sampled token not yet fed
    cancelled: bool = False
    followers: list[_Row] = field(default_factory=list)  # Request.n > 1: rows that fork at the prompt's end
    leader: _Row | None = None  # a follower's leader, until the fork
    last_logits: Tensor | None = None  # prompt log-probabilities: the previous piece's last position

    @property
    def end(self) -> int:
        return len(self.tokens)

    @property
    def width(self) -> int:
        """Rows this takes: itself and the followers it will fork into."""
        return 1 + len(self.followers)

    def cut_after(self, pos: int) -> int:
        """The end of the piece that starts at `pos`: the next multiple of `piece` from the
        start, the next keep position, or the prompt's end."""
        grid = self.start + ((pos - self.start) // self.piece + 1) * self.piece
        marks = [p for p in self.marks if pos < p < grid]
        return min([grid, self.end, *marks])


class Scheduler:
    """Serves every reply and prompt read of one engine, batching decode steps across rows."""

    def __init__(self, engine: Engine, max_batch: int = 16, prefill_budget: int = 256, max_waiting: int = 16,
                 name: str = "model", cache: PrefixCache | None = None, checkpoint_tokens: int = 1024,
                 start: bool = True):
        if max_batch < 1 or prefill_budget < 1 or max_waiting < 0 or checkpoint_tokens < 1:
            raise ValueError("max_batch, prefill_budget and checkpoint_tokens must be >= 1, max_waiting >= 0")
        self.engine, self.max_batch, self.max_waiting = engine, max_batch, max_waiting
        self.prefill_budget, self.cache, self.checkpoint_tokens = prefill_budget, cache, checkpoint_tokens
        self.piece = min(engine.chunk_size, prefill_budget)  # prompt pieces: same cuts whatever runs
        slots = engine.decode_bucket(max_batch)
        self.conv, self.ssm = zero_state(engine.config, slots, engine.dtype, engine.device)  # [L, S, D, K-1], [L, S, D, N]
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Row] = collections.deque()
        self._reading: list[_Row] = []  # admitted, prompt not read yet
        self._decoding: list[_Row] = []  # in slot order
        self._closed = False
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)
        self._counts = dict(steps=0, tokens=0, prefill_tokens=0, busy_refusals=0, errors=0, failed_requests=0,
                            last_batch=0, kept_states=0, checkpoints=0, cache_errors=0, cancelled=0)
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name=f"scheduler-{name}", daemon=True)
            self._thread.start()

    # -- callers -------------------------------------------------------------------------------
    def submit(self, req: Request) -> Reply:
        """Queue `req`; iterate the Reply for its progress and tokens (close() cancels)."""
        tokens = self._check_request(req)
        row = self._new_row(req, tokens)
        for i in range(1, req.n):
            seed = req.sampling.seed
            sampling = req.sampling if seed is None else replace(req.sampling, seed=(seed + i) % 2**63)
            follower = self._new_row(replace(req, sampling=sampling, n=1), tokens)
            follower.leader = row
            row.followers.append(follower)
            row.reply.siblings.append(follower.reply)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("this model was unloaded; select it again to continue")
            if self._rows() + sum(r.width for r in self._waiting) + row.width > self.max_batch + self.max_waiting:
                self._counts["busy_refusals"] += 1
                raise SchedulerBusy(f"The server is busy: {self._rows()} replies are running and "
                                    f"{len(self._waiting)} are waiting. Try again in a moment.")
            self._waiting.append(row)
            self._cond.notify()
        return row.reply

    def _new_row(self, req: Request, tokens: list[int]) -> _Row:
        reply = Reply(req)
        reply.metrics.prompt_tokens = len(tokens)
        row = _Row(req, reply, tokens, self.piece)
        reply._cancel = lambda _reply: self._cancel(row)
        return row

    def _check_request(self, req: Request) -> list[int]:
        """The prompt as a list of ints; a request the scheduler cannot serve is refused here, in
        the caller's thread, with a message for the user."""
        if not isinstance(req.sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, got {type(req.sampling).__name__}")
        if req.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {req.max_new_tokens}")
        tokens = req.tokens.tolist() if isinstance(req.tokens, Tensor) else list(req.tokens)
        if not tokens:
            raise ValueError("the prompt is empty: nothing to read")
        vocab = self.engine.config.vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}), got min {min(tokens)} max {max(tokens)}")
        if not 1 <= req.n <= self.max_batch:
            raise RequestRefused(f"n must be from 1 to {self.max_batch} (the rows this model decodes at once), "
                                 f"got {req.n}")
        if req.n > 1 and not req.max_new_tokens:
            raise RequestRefused("n > 1 needs max_new_tokens >= 1: replies, not a read")
        if req.prompt_logprobs is not None and not 0 <= req.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestRefused(f"prompt_logprobs must be from 0 to {MAX_TOP_LOGPROBS}, got {req.prompt_logprobs}")
        limit = len(tokens) - 1 if req.max_new_tokens else len(tokens)
        if req.resume is not None:
            self.engine.check_state(req.resume, 1)
            if not 0 <= req.resume_at <= limit:
                raise ValueError(f"the state handed in holds {req.resume_at} tokens; at most {limit} fit here")
        return tokens

    def stream(self, state: State, ids: Tensor, sampling: SamplingParams | None = None,
               max_new_tokens: int = 256, stop_token_ids: Iterable[int] = (), tokenizer: object | None = None,
               context_ids: Tensor | None = None, report_progress: bool = False) -> Reply:
        """Like Engine.stream, batched with every other row: read ids [1, T] after `state` (advanced
        in place), then sample. No prefix cache: the caller keeps its own state."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        context = context_ids.reshape(-1).tolist() if context_ids is not None else ()
        stops = tuple(int(t) for t in stop_token_ids)
        return self.submit(Request(_ids_list(ids), sampling=sampling or SamplingParams(),
                                   max_new_tokens=max_new_tokens, stop_token_ids=stops, tokenizer=tokenizer,
                                   progress=report_progress, cache=False, resume=state, context=context))

    def prefill(self, state: State, ids: Tensor, progress: Callable[[int, int], None] | None = None) -> State:
        """Read ids [1, T] into `state` (in place) through the scheduler, in budgeted pieces.

        progress(done, total) runs in the caller's thread after each piece; an exception it raises
        stops the read between pieces (the state then holds a prefix: the caller discards it).
        """
        reply = self.submit(Request(_ids_list(ids), progress=progress is not None, cache=False, resume=state))
        try:
            for item in reply:
                if progress is not None and isinstance(item, Progress):
                    progress(item.done, item.total)
        finally:
            reply.close()
        return state

    def _cancel(self, row: _Row) -> None:
        with self._cond:
            row.cancelled = True
            if row in self._waiting or row.leader is not None:  # not started, or not forked yet
                if row in self._waiting:
                    self._waiting.remove(row)
                self._counts["cancelled"] += 1
                row.reply._end(None, "cancelled")
            self._cond.notify()
        row.reply.done.wait()

    def close(self) -> None:
        """Stop the thread; requests still running or waiting end with SchedulerClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._stop_thread()

    def close_if_idle(self) -> bool:
        """Close (as close() does) only if no row runs or waits, decided under the lock submit()
        takes, so no request is admitted in between; True when it closed."""
        with self._cond:
            if self._closed:
                return True
            if self._rows() or self._waiting:
                return False
            self._closed = True
            self._cond.notify()
        self._stop_thread()
        return True

    def _stop_thread(self) -> None:
        """After _closed is set: let the thread end the rows (or end them here when it never ran)."""
        if self._thread is not None:
            self._thread.join(timeout=30)
        else:
            self._end_all()

    def in_use(self) -> int:
        """Rows running or waiting right now (the model has users while this is above 0)."""
        with self._cond:
            return self._rows() + sum(r.width for r in self._waiting)

    # -- figures -------------------------------------------------------------------------------
    def _rows(self) -> int:
        return sum(r.width for r in self._reading) + len(self._decoding)

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
                "prefill_budget": self.prefill_budget, "checkpoint_tokens": self.checkpoint_tokens,
                "agg_tok_s": tokens / span if span else 0.0,
                "state_bytes_active": per_row * self._rows(), "slot_buffer_bytes": per_row * self.conv.shape[1],
                **self._counts,
            }

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        while self.run_once(block=True):
            pass
        self._end_all()

    def _end_all(self) -> None:
        with self._cond:
            rows = [*self._waiting, *self._reading, *self._decoding]
            self._waiting.clear()
        for row in rows:
            self._finish(row, SchedulerClosed("this model was unloaded; select it again to continue"), "error",
                         keep_state=False)

    def run_once(self, block: bool = False) -> bool:
        """One iteration (the thread calls it in a loop; tests may call it directly with start=False).
        Returns False once the scheduler is closed."""
        with self._cond:
            while block and not self._closed and not (self._waiting or self._reading or self._decoding):
                self._cond.wait()
            if self._closed:
                return False
            dropped = [r for r in [*self._reading, *self._decoding] if r.cancelled]
            self._counts["cancelled"] += len(dropped)
            admitted, width = [], 0
            while self._waiting and self._rows() + width + self._waiting[0].width <= self.max_batch:
                admitted.append(self._waiting.popleft())
                width += admitted[-1].width
        for row in dropped:
            self._finish(row, None, "cancelled", keep_state=True)
        for row in admitted:
            if self._guarded(row, self._admit, row) and not row.reply.done.is_set():
                with self._cond:
                    self._reading.append(row)
        try:
            self._iteration()
        except Exception as e:  # a bug outside the rows' own guards: end the rows it may have touched
            log.exception("scheduler iteration failed")
            self._counts["errors"] += 1
            with self._cond:
                rows = [*self._reading, *self._decoding]
            for row in rows:
                self._finish(row, RequestFailed(f"the server failed while serving this request: {e}"), "error",
                             keep_state=False)
        return True

    @torch.inference_mode()
    def _iteration(self) -> None:
        with self._cond:
            todo = plan([r for r in self._reading if not r.cancelled], self._decoding, self.prefill_budget,
                        max(self.engine.chunk_size, self.piece))
        for row, n in todo.reads:
            self._guarded(row, self._read, row, n)
        with self._cond:
            decoding = list(self._decoding)  # rows whose prompt was read just now join this step
        if decoding:
            self._decode_step(decoding)

    def _guarded(self, row: _Row, fn: Callable, *args) -> bool:
        """Run one row's work; a failure ends that row alone. False when it failed."""
        try:
            fn(*args)
            return True
        except Exception as e:
            log.warning("request failed in %s: %s: %s", fn.__name__, type(e).__name__, e)
            self._counts["failed_requests"] += 1
            self._finish(row, _failure(e), "error", keep_state=False)
            return False

    # -- a row's life --------------------------------------------------------------------------
    def _admit(self, row: _Row) -> None:
        """Where reading starts: the longest cached prefix, or the caller's state if it holds more."""
        req, eng = row.req, self.engine
        limit = row.end - 1 if req.max_new_tokens else row.end  # a reply reads its last token itself
        start, state, source = 0, None, FRESH
        scoring = req.prompt_logprobs is not None  # reads from the start: the cache holds no logits
        if req.cache and self.cache is not None and not scoring:
            n, copy, node = self.cache.lookup(row.tokens[:limit], req.namespace, eng.device, lambda: None)
            if node is not None and n >= req.resume_at:
                start, state, source = n, copy, HIT
                if n in req.keep_at or n == limit:
                    row.reply.kept[n] = node
        if state is None and req.resume is not None and not scoring:
            start, state, source = req.resume_at, req.resume, GIVEN
        if state is None:
            state = eng.new_state()
        if start < req.expect:
            source = REBUILT
        row.state, row.start, row.read = state, start, start
        row.marks = self._marks(req, start, row.end)
        reply = row.reply
        reply.start, reply.source = start, source
        reply.metrics.prompt_tokens = row.end - start
        if scoring:
            reply.prompt_logprobs.append(None)  # the first token follows nothing
        reply.admitted.set()
        if start == row.end:  # a read whose every token was cached
            self._prompt_read(row, None)

    def _marks(self, req: Request, start: int, end: int) -> dict[int, bool]:
        """Positions in (start, end] where a state is kept: True for the caller's and the turn
        points, False for checkpoints (evicted first)."""
        if not req.cache or self.cache is None:
            return {}
        marks = {p: True for p in req.keep_at if start < p <= end}
        marks[end - 1 if req.max_new_tokens else end] = True  # retry point / a read's end
        step = self.checkpoint_tokens
        for p in range((start // step + 1) * step, end, step):
            marks.setdefault(p, False)
        if end - start > 2 * TAIL_TOKENS:
            marks.setdefault(end - TAIL_TOKENS, False)
        marks.pop(start, None)
        return marks

    def _read(self, row: _Row, n: int) -> None:
        """Read the next n prompt tokens (whole pieces), keeping states at the marks passed."""
        target, logits = row.read + n, None
        while row.read < target and not row.cancelled:
            cut = row.cut_after(row.read)
            t0 = time.perf_counter()
            piece = torch.tensor([row.tokens[row.read:cut]])
            if row.req.prompt_logprobs is None:
                logits = self.engine.prefill(piece, row.state)
            else:
                logits = self._score(row, piece)
            row.reply.metrics.prefill_s += time.perf_counter() - t0
            self._counts["prefill_tokens"] += cut - row.read
            row.read = row.reply.read = cut
            if cut in row.marks:
                self._keep(row, cut, row.marks[cut])
            if row.req.progress:
                row.reply.out.put(Progress(row.read - row.start, row.end - row.start))
        if row.read == row.end and not row.cancelled:
            self._prompt_read(row, logits)

    def _score(self, row: _Row, piece: Tensor) -> Tensor:
        """Read one piece with every position's logits; record each of its tokens' log-probability
        (the first token's comes from the previous piece's last position). Returns the last logits."""
        logits = self.engine.prefill(piece, row.state, all_logits=True)[0]  # [T, V]
        before = logits[:-1] if row.last_logits is None else torch.cat([row.last_logits, logits[:-1]])
        targets = piece[0, 1:] if row.last_logits is None else piece[0]
        lp = torch.log_softmax(before.float(), -1)
        chosen = lp.gather(1, targets.to(lp.device).unsqueeze(1))[:, 0].tolist()
        k = row.req.prompt_logprobs
        if k:
            values, ids = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
            tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            tops = [()] * len(chosen)
        row.reply.prompt_logprobs.extend(zip(chosen, tops))
        row.last_logits = logits[-1:]
        return logits[-1:]

    def _prompt_read(self, row: _Row, logits: Tensor | None) -> None:
        row.last_logits = None
        if row.req.max_new_tokens == 0:
            self._finish(row, None, "length", keep_state=True)
            return
        followers, row.followers = row.followers, []
        self._start_decoding(row, row.state, logits)
        for f in followers:  # n replies: the prompt's state copied into each other row
            with self._cond:
                f.leader = None
                if f.cancelled:
                    continue
            f.t_submit, f.start, f.read = row.t_submit, row.start, row.read
            f.reply.start, f.reply.source, f.reply.read = row.start, row.reply.source, row.reply.read
            f.reply.metrics.prompt_tokens, f.reply.metrics.prefill_s = (row.reply.metrics.prompt_tokens,
                                                                        row.reply.metrics.prefill_s)
            f.reply.admitted.set()
            self._guarded(f, self._start_decoding, f, row.state.clone(), logits)

    def _start_decoding(self, row: _Row, state: State, logits: Tensor) -> None:
        """The row's first token from the prompt's last logits; the row takes a decode slot."""
        req = row.req
        row.state = state
        penalty = req.sampling.repetition_penalty != 1.0
        context = [*req.context, *row.tokens] if penalty else ()  # what the penalty sees
        row.decoder = DecodeRow(req.sampling, req.max_new_tokens, req.stop_token_ids, req.tokenizer, context,
                                self.engine.config.vocab_size, self.engine.device, row.reply.metrics,
                                req.options)
        row.pending = row.decoder.choose(logits)
        with self._cond:
            if row in self._reading:
                self._reading.remove(row)
            row.slot = len(self._decoding)
            self.conv[:, row.slot].copy_(row.state.conv[:, 0])
            self.ssm[:, row.slot].copy_(row.state.ssm[:, 0])
            self._decoding.append(row)

    def _keep(self, row: _Row, pos: int, keep: bool, tokens: Sequence[int] | None = None) -> None:
        """Put the row's state (after tokens[:pos]) into the prefix cache. A failure here costs
        only a later re-read: it is counted, and the request goes on."""
        try:
            state = row.state
            snap = state.clone() if state.device == self.cache.device else state  # the cache copies otherwise
            node = self.cache.insert(list((tokens if tokens is not None else row.tokens)[:pos]), snap,
                                     row.req.namespace, checkpoint=not keep)
            self._counts["kept_states" if keep else "checkpoints"] += 1
            if keep:
                row.reply.kept[pos] = node
        except Exception as e:
            log.warning("could not keep a state: %s: %s", type(e).__name__, e)
            self._counts["cache_errors"] += 1

    def _decode_step(self, rows: list[_Row]) -> None:
        n = len(rows)
        b = self.engine.decode_bucket(n)  # n on CPU; a captured CUDA-graph size on CUDA (spare slots pad)
        ids = torch.tensor([r.pending for r in rows] + [0] * (b - n), device=self.engine.device)
        try:
            logits = self.engine.decode_step(ids, self.conv[:, :b], self.ssm[:, :b], static=True)[:n]  # [n, V]
        except Exception as e:  # the batched step itself: no single row to blame
            log.exception("decode step failed")
            self._counts["errors"] += 1
            for row in rows:
                self._finish(row, RequestFailed(f"the model step failed: {type(e).__name__}: {e}"), "error",
                             keep_state=False)
            return
        now = time.perf_counter()
        self._counts["steps"] += 1
        self._counts["tokens"] += n
        self._counts["last_batch"] = n
        with self._cond:
            self._recent.append((now, n))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()
        for i, row in enumerate(rows):
            self._guarded(row, self._advance, row, logits[i:i + 1], n, now)

    def _advance(self, row: _Row, logits: Tensor, batch: int, now: float) -> None:
        """Hand out the token the step just fed, then sample the row's next one."""
        tid = row.pending
        event = row.decoder.emit(tid, row.t_submit, batch, now)
        row.reply.fed.append(tid)
        if event.finish_reason:
            self._finish(row, event, event.finish_reason, keep_state=True)
            return
        row.reply.out.put(event)
        row.pending = row.decoder.choose(logits)

    def _finish(self, row: _Row, last: TokenEvent | BaseException | None, reason: str, keep_state: bool) -> None:
        """Take the row out: its state back from its slot, kept in the cache, then its end."""
        with self._cond:
            if row in self._waiting:
                self._waiting.remove(row)
            if row in self._reading:
                self._reading.remove(row)
            if row in self._decoding:
                self._release_slot(row, keep_state)
            followers, row.followers = row.followers, []
        for f in followers:  # never forked: they end as their leader did
            f.leader = None
            f.reply._end(last if isinstance(last, BaseException) else None, reason)
        reply = row.reply
        if keep_state and row.state is not None and row.read == row.end:  # prompt (and reply) whole
            if row.req.cache and self.cache is not None and reply.fed:
                self._keep(row, row.end + len(reply.fed), True, [*row.tokens, *reply.fed])
            reply.end_state = row.state
        reply._end(last, reason)

    def _release_slot(self, row: _Row, keep_state: bool) -> None:
        """Free the row's slot (lock held), copying its state back first when it is kept."""
        slot, last_row = row.slot, len(self._decoding) - 1
        if keep_state:
            row.state.conv[:, 0].copy_(self.conv[:, slot])
            row.state.ssm[:, 0].copy_(self.ssm[:, slot])
            row.state.seqlen += len(row.reply.fed)  # every token handed out was fed in the slot
        if slot != last_row:  # the last row moves into the freed slot
            moved = self._decoding[last_row]
            self.conv[:, slot].copy_(self.conv[:, last_row])
            self.ssm[:, slot].copy_(self.ssm[:, last_row])
            moved.slot = slot
            self._decoding[slot] = moved
        self._decoding.pop()
        row.slot = -1


def _ids_list(ids: Tensor) -> list[int]:
    if not isinstance(ids, Tensor):
        raise TypeError(f"token ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"a request reads one sequence: token ids of shape [1, T], got {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token ids must be int64 or int32, got {ids.dtype}")
    return ids[0].tolist()


def _failure(e: Exception) -> RequestFailed:
    """The user's message for a row that failed (the cause stays attached for the logs)."""
    err = RequestFailed(f"this request failed and was ended: {type(e).__name__}: {e}")
    err.__cause__ = e
    return err


__all__ = ["Progress", "Reply", "Request", "RequestFailed", "Scheduler", "SchedulerBusy", "SchedulerClosed",
           "StreamMetrics"]
