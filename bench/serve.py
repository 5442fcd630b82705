"""Many users at once: continuous batching measured through the conversation layer.

    python bench/serve.py --json                 # two random-weight models on CPU, N = 1..32 (~12 min)
    python bench/serve.py --quick --json         # N = 1, 4, 16, every section smaller (~40 s; the same keys)
    python bench/serve.py --budgets 16,32,64     # also: the document read at other prefill budgets
    python bench/serve.py --rows --config kernels_check/falcon-mamba-7b.config.json \
        --device cuda --dtype bf16 --streams 1,2,4,8,16,32,64 --json      # 7B shape, straight to the scheduler

Each simulated user is a Conversation of the app (ModelManager, the model's BatchedRunner and
Scheduler) sending one message, consumed on a thread of its own that takes a timestamp per token
event; N users send at once (greedy, --max-new-tokens each). Per N:
  agg_tok_s         all tokens / wall time from the common start to the last token
  per_stream_tok_s  median over streams of (tokens - 1) / (last token - first token)
  p50/p95_itl_s     inter-token latency, pooled over every stream's consecutive token events
  ttft_s            median time from send() to the first token event
Every reply is compared token for token with its solo reply: the same message in a fresh
conversation served alone (the N = 1 figures are the median over the first --solo-runs of those).

Where the time went, per run: decode steps and their mean rows, ms per step (wall and CPU), prompt
reading, the rest (scheduler, sampling, handing out events), the process's CPU seconds and their
share of the wall time (below 1: other programs had the core). engine_step_ms is one bare decode
step per batch size, the model's own cost: 16 x step(1) / step(16) bounds what batching can gain.
On a shared machine wall-clock figures move with the load; agg_tok_per_cpu_s, loop_cpu_ms (CPU
per step outside prompt reading) and own_core_ratio are the same figures from CPU time, what a
core of its own would show, and the targets print them next to the wall-clock ratios.

Models are random-weight checkpoints written to a temporary directory and registered as presets
(the trained tiny instruct model ends short answers early; random weights ramble on, and the
special tokens' rows of lm_head are zeroed so that no stop token ever wins: every reply runs
--max-new-tokens tokens, which the JSON confirms with min_new_tokens):
  tiny-shape   the bundled tiny shape (4 layers, hidden 256; 3.0M parameters), bundled tokenizer
  random-22m   12 layers, hidden 512, inner 1024, dt rank 32 (22.4M parameters), bundled tokenizer
both fp32, instruct chat format, torch on --threads CPU threads.

Prefill interference: --interference-streams users decode while another user sends a document of
--doc-tokens tokens (Conversation.send(..., allow_long=True), the Long context tab's path), started
once every stream has its first token and stopped between pieces when the streams are done. The
figure: the streams' p95 inter-token latency over the read against the same streams without it.

short_during_long_read: the time to first token of a 20-token prompt sent while another
request's prompt of --long-prompt-tokens is being read and --short-streams rows decode, over the
same prompt's time to first token on the idle model (the median of 3), straight to the model's
Scheduler (stream / prefill); long_read_tokens_at_first_token says how much of the long prompt had
been read when the short one got its first token (all of it where the short prompt waits for the
whole read).

http: the app itself (Gradio and /v1, in this process) on 127.0.0.1 serving --http-model (random-22m
by default: on the tiny shape a decode step costs less than Gradio's own work per update):
  gradio   --http-users gradio_client users (a Client, a session, each) sending /chat at once, and
           the same messages one by one in fresh sessions: aggregate tok/s of each and their ratio
  v1       the same with streaming /v1/chat/completions requests (the official openai client),
           each in a cache namespace of its own (cache_salt), so no run finds another's prompt
  context_decode  decode tok/s of one /v1 stream after --contexts tokens of context (a document in
           the message), as ratios to the first context (0); the best of two requests per context
Every reply at once is compared with its one-by-one reply, text for text (greedy).

context_decode_engine: the same decode rate after --contexts tokens, straight to the scheduler
(a Request of token ids), without HTTP.

--rows skips conversations, tokenizers and the HTTP section: requests of random token ids go
straight to a Scheduler over a random-weight model of --config's shape (kernels_check/models.py
builds it in place, so a 7B-shaped model needs no download and no checkpoint on disk); scripts/gpu_check.sh runs it on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fm_demo.conversations.sessions import Conversation  # noqa: E402
from fm_demo.engine import Engine, SamplingParams, TokenEvent  # noqa: E402
from fm_demo.models import ModelManager  # noqa: E402
from fm_demo.serving import Request, Scheduler  # noqa: E402
from fm_demo.settings import Preset, Settings, tiny_checkpoint  # noqa: E402
from fm_demo.tiny.config import TinyDims  # noqa: E402

STREAMS = (1, 2, 4, 8, 16, 32)
QUICK = {"streams": (1, 4, 16), "max_new_tokens": 32, "doc_tokens": 2048, "interference_streams": 4,
         "solo_runs": 2, "short_streams": 4, "long_prompt_tokens": 8192, "http_users": 4, "contexts": (0, 2048),
         "context_decode_tokens": 32, "http_model": "tiny-shape"}
SHAPES = {  # name -> (TinyDims overrides, what it is)
    "tiny-shape": ({}, "random weights, the bundled tiny shape (4 layers, hidden 256)"),
    "random-22m": ({"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 12, "time_step_rank": 32},
                   "random weights, 12 layers, hidden 512, inner 1024, dt rank 32"),
}
TOPICS = ["falcons", "deserts", "the sea", "mountains", "rivers", "cities", "forests", "the moon",
          "numbers", "music", "winter", "bridges", "gardens", "trains", "clocks", "islands"]
TARGETS = {"agg_16_over_1_min": 4.0, "p95_itl_16_over_1_max": 4.0, "p95_itl_read_over_none_max": 3.0}


def user_message(i: int) -> str:
    """A different message per user, so every row decodes a sequence of its own."""
    topic = TOPICS[i % len(TOPICS)]
    return f"User {i + 1} here. Tell me a long story about {topic}, with {i % 7 + 2} small details."


def document(tokenizer, n_tokens: int) -> str:
    """Plain text of n_tokens tokens, give or take a few (no sentence repeats exactly)."""
    parts: list[str] = []
    while not parts or len(tokenizer.encode(" ".join(parts))) < n_tokens:
        parts += [f"Section {i}: the {TOPICS[i % len(TOPICS)]} of page {i * 7 % 101} were calm. {user_message(i)}"
                  for i in range(len(parts), len(parts) + 200)]
    return tokenizer.decode(tokenizer.encode(" ".join(parts))[:n_tokens], skip_special_tokens=True)


# -- measuring -----------------------------------------------------------------------------------
@dataclass
class Stream:
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # perf_counter at each token event
    t_start: float = 0.0
    error: str | None = None


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (q in [0, 1])."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def itls(streams: list[Stream], after: float = float("-inf"), before: float = float("inf")) -> list[float]:
    """Gaps between consecutive token events whose later event falls in (after, before]."""
    return [b - a for s in streams for a, b in zip(s.times, s.times[1:]) if after < b <= before]


def summarize(streams: list[Stream], costs: dict) -> dict:
    done = [s for s in streams if s.times]
    t0, t_end = min(s.t_start for s in streams), max(s.times[-1] for s in done)
    total = sum(len(s.times) for s in done)
    gaps = itls(done)
    rates = [(len(s.times) - 1) / (s.times[-1] - s.times[0]) for s in done if len(s.times) > 1]
    return {
        "agg_tok_s": total / (t_end - t0), "per_stream_tok_s": statistics.median(rates) if rates else 0.0,
        "p50_itl_s": percentile(gaps, 0.5), "p95_itl_s": percentile(gaps, 0.95), "max_itl_s": max(gaps, default=0.0),
        "ttft_s": statistics.median(s.times[0] - s.t_start for s in done),
        "ttft_max_s": max(s.times[0] - s.t_start for s in done),
        "tokens": total, "wall_s": t_end - t0, "min_new_tokens": min(len(s.times) for s in streams),
        "errors": sum(s.error is not None for s in streams), **costs,
        "agg_tok_per_cpu_s": total / max(costs["cpu_s"], 1e-9),
    }


class Meter:
    """Where a run's time goes, seen from the two engine entry points the scheduler calls: decode
    steps (Engine.decode_step) and prompt pieces (Engine.prefill), wrapped on the engine instance;
    plus the process's CPU time, which other programs on a shared machine do not inflate."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.n = {"steps": 0, "rows": 0, "decode_s": 0.0, "decode_cpu_s": 0.0, "prefill_s": 0.0,
                  "prefill_cpu_s": 0.0, "pieces": 0, "prefill_tokens": 0}
        sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
        step, prefill = engine.decode_step, engine.prefill

        # *args, **kwargs pass through whatever the engine's methods take (decode_step gained
        # `static`); only the leading arguments, the same since the start, are read here
        def timed_step(ids, *args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            logits = step(ids, *args, **kwargs)
            sync()
            self.n["decode_s"] += time.perf_counter() - t0
            self.n["decode_cpu_s"] += time.thread_time() - c0
            self.n["steps"] += 1
            self.n["rows"] += ids.shape[0]
            return logits

        def timed_prefill(ids, *args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            logits = prefill(ids, *args, **kwargs)
            sync()
            self.n["prefill_s"] += time.perf_counter() - t0
            self.n["prefill_cpu_s"] += time.thread_time() - c0
            self.n["pieces"] += 1
            self.n["prefill_tokens"] += ids.shape[-1]
            return logits

        engine.decode_step, engine.prefill = timed_step, timed_prefill
        self.sync = sync

    def mark(self) -> tuple[float, float, dict]:
        return time.perf_counter(), time.process_time(), dict(self.n)

    def costs(self, since: tuple[float, float, dict]) -> dict:
        """Decode steps, their mean rows and time, prompt reading, the rest (the scheduler's own work,
        sampling, handing out events, waiting for the GIL), and CPU time against wall time."""
        t0, c0, n0 = since
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        d = {k: self.n[k] - n0[k] for k in self.n}
        steps = max(d["steps"], 1)
        return {"steps": d["steps"], "mean_rows": d["rows"] / steps, "step_ms": 1e3 * d["decode_s"] / steps,
                "step_cpu_ms": 1e3 * d["decode_cpu_s"] / steps, "pieces": d["pieces"],
                "piece_cpu_ms": 1e3 * d["prefill_cpu_s"] / max(d["pieces"], 1),
                "iteration_cpu_ms": 1e3 * (d["decode_cpu_s"] + d["prefill_cpu_s"]) / steps,
                # everything but prompt reading, per step: the step, sampling, the scheduler's books
                # and the consumers' threads; on a core of its own this is the inter-token latency
                "loop_cpu_ms": 1e3 * (cpu - d["prefill_cpu_s"]) / steps,
                "decode_s": d["decode_s"], "prefill_s": d["prefill_s"], "prefill_tokens": d["prefill_tokens"],
                "other_s": wall - d["decode_s"] - d["prefill_s"], "cpu_s": cpu, "cpu_share": cpu / wall,
                "load_1m": os.getloadavg()[0]}

    def step_ms(self, batch: int, reps: int = 5) -> float:
        """Median ms of one bare decode step of `batch` rows (no scheduler): the model's own cost."""
        e = self.engine
        state = e.new_state(batch)
        ids = torch.zeros(batch, dtype=torch.long, device=e.device)
        times = []
        for i in range(reps + 2):
            t0 = time.perf_counter()
            e.decode_step(ids, state.conv, state.ssm)
            self.sync()
            if i >= 2:
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)


class Crowd:
    """Users replying at once, one thread each, released together by go()."""

    def __init__(self, users: list, meter: Meter):
        self.users, self.streams, self.meter = users, [Stream() for _ in users], meter
        self.first = [threading.Event() for _ in users]
        self._gate = threading.Barrier(len(users) + 1)
        self._threads = [threading.Thread(target=self._consume, args=(i,), daemon=True) for i in range(len(users))]
        for t in self._threads:
            t.start()

    def _consume(self, i: int) -> None:
        s = self.streams[i]

        def tick() -> None:
            s.times.append(time.perf_counter())
            self.first[i].set()

        self._gate.wait()
        s.t_start = time.perf_counter()
        try:
            s.tokens = self.users[i].reply(tick)
        except Exception as e:  # counted and reported, never hidden
            s.error = f"{type(e).__name__}: {e}"
        finally:
            self.first[i].set()

    def go(self) -> Crowd:
        self._since = self.meter.mark()
        self._gate.wait()
        return self

    def wait_first_tokens(self, timeout: float = 600) -> None:
        for ev in self.first:
            ev.wait(timeout)

    def join(self, timeout: float = 900) -> list[Stream]:
        for t in self._threads:
            t.join(timeout)
        self.costs = self.meter.costs(self._since)
        return self.streams


def run_crowd(bench: Bench, users: range | list[int]) -> tuple[list[Stream], dict]:
    """Users `users` (indices) replying at once: their streams and the run's costs."""
    crowd = Crowd([bench.make_user(i) for i in users], bench.meter).go()
    return crowd.join(), crowd.costs


# -- users: conversations (the app's path) or raw scheduler rows --------------------------------
class ChatUser:
    """A fresh Conversation sending one message: the path of a browser or API user."""

    def __init__(self, lm, settings: Settings, text: str, max_new: int):
        self.conv, self.text, self.max_new = Conversation(lm, settings), text, max_new

    def reply(self, tick: Callable[[], None]) -> list[int]:
        for ev in self.conv.send(self.text, SamplingParams(), self.max_new):
            if not ev.done:
                tick()
        return list(self.conv.turns[-1].reply_ids)


class RowUser:
    """A request of token ids straight to the scheduler (no conversation, no tokenizer)."""

    def __init__(self, sched: Scheduler, ids: torch.Tensor, max_new: int):
        self.sched, self.ids, self.max_new = sched, ids, max_new

    def reply(self, tick: Callable[[], None]) -> list[int]:
        out = []
        for ev in self.sched.stream(self.sched.engine.new_state(), self.ids, SamplingParams(), self.max_new):
            if isinstance(ev, TokenEvent):
                tick()
                out.append(ev.token_id)
        return out


class _ReadStopped(Exception):
    pass


class Reader:
    """Reads a document through the scheduler until it is done or `stop` is set (between pieces)."""

    def __init__(self, start_read: Callable[[Callable[[int, int], None]], None]):
        self._start_read, self.stop = start_read, threading.Event()
        self.done_tokens, self.total_tokens, self.t0, self.t1, self.finished = 0, 0, 0.0, 0.0, False

    def __call__(self) -> None:
        def progress(done: int, total: int) -> None:
            self.done_tokens, self.total_tokens = done, total
            if self.stop.is_set():
                raise _ReadStopped

        self.t0 = time.perf_counter()
        try:
            self._start_read(progress)
            self.finished = True
        except _ReadStopped:
            pass
        self.t1 = time.perf_counter()


# -- a model under test --------------------------------------------------------------------------
class Bench:
    """One model: makes users and readers of either kind, meters its engine, keeps solo replies."""

    def __init__(self, name: str, scheduler: Scheduler, make_user: Callable[[int], object],
                 make_reader: Callable[[], Reader], info: dict, close: Callable[[], None]):
        self.name, self.make_user, self.make_reader, self.info = name, make_user, make_reader, info
        self.scheduler = scheduler  # the model's one scheduler (the app's, for a chat model)
        self.meter = Meter(scheduler.engine)
        self.close = close  # stops the model's scheduler thread
        self.solo: dict[int, tuple[Stream, dict]] = {}

    def solo_reply(self, i: int) -> Stream:
        if i not in self.solo:
            streams, costs = run_crowd(self, [i])
            self.solo[i] = streams[0], costs
        return self.solo[i][0]


def chat_bench(name: str, lm, settings: Settings, max_new: int, doc_tokens: int, info: dict) -> Bench:
    doc = document(lm.tokenizer, doc_tokens)

    def make_reader() -> Reader:
        conv = Conversation(lm, settings)
        return Reader(lambda progress: list(conv.send(doc, SamplingParams(), 1, progress=progress,
                                                      allow_long=True)))

    return Bench(name, lm.runner.scheduler, lambda i: ChatUser(lm, settings, user_message(i), max_new),
                 make_reader, info, lm.runner.close)


def row_bench(name: str, sched: Scheduler, max_new: int, doc_tokens: int, info: dict) -> Bench:
    vocab = sched.engine.config.vocab_size

    def ids(i: int, n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1000 + i))

    def make_reader() -> Reader:
        doc = ids(-1, doc_tokens)
        return Reader(lambda progress: sched.prefill(sched.engine.new_state(), doc, progress))

    return Bench(name, sched, lambda i: RowUser(sched, ids(i, 24 + i % 17), max_new), make_reader, info,
                 sched.close)


def sweep(bench: Bench, streams: tuple[int, ...], solo_runs: int, solo_check: int, deadline: float) -> dict:
    """The figures per N and whether every checked reply equals its solo reply."""
    step = {str(n): bench.meter.step_ms(n) for n in streams}
    out: dict = {**bench.info, "engine_step_ms": step, "streams": {}}
    if "1" in step and "16" in step:  # what the model's own step allows, before any serving cost
        out["engine_agg_16_over_1"] = 16 * step["1"] / step["16"]
    for i in range(min(max(streams), solo_check)):
        bench.solo_reply(i)
    ones = [summarize([bench.solo[i][0]], bench.solo[i][1]) for i in range(solo_runs)]
    mismatches = []
    for n in streams:
        if n == 1:
            out["streams"]["1"] = {**{k: statistics.median(r[k] for r in ones) for k in ones[0]},
                                   "min_new_tokens": min(r["min_new_tokens"] for r in ones), "runs": solo_runs}
            continue
        if time.perf_counter() > deadline:
            out["streams"][str(n)] = {"skipped": "past --deadline-s"}
            continue
        got, costs = run_crowd(bench, range(n))
        out["streams"][str(n)] = summarize(got, costs)
        mismatches += [{"streams": n, "user": i, "first_diff": _first_diff(s.tokens, bench.solo[i][0].tokens)}
                       for i, s in enumerate(got) if i in bench.solo and s.tokens != bench.solo[i][0].tokens]
    out["identical_to_solo"] = not mismatches
    out["solo_checked_users"] = len(bench.solo)
    out["mismatches"] = mismatches[:20]
    return out


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def all_started(streams: list[Stream]) -> float:
    """When the last stream got its first token: from then on every row is decoding."""
    return max(s.times[0] for s in streams if s.times)


def read_alone(bench: Bench, seconds: float) -> float:
    """Tokens/s of the document read with nothing else running, over its first `seconds`."""
    reader = bench.make_reader()
    timer = threading.Timer(seconds, reader.stop.set)
    timer.start()
    reader()
    timer.cancel()
    return reader.done_tokens / max(reader.t1 - reader.t0, 1e-9)


def interference(bench: Bench, n: int, budget: int, alone: tuple[list[Stream], dict]) -> dict:
    """n streams while a document is read, against the same n streams alone (`alone`: streams and
    costs): their p95 inter-token latency, both counted from the moment every stream decodes (the
    admissions before are not the read's doing). The same figure from CPU time (decode step plus
    the pieces read per step, against a step without reading) says what a core of its own would
    show, where other programs share the machine and make the wall-clock ratio noisy."""
    alone, alone_costs = alone
    crowd, reader = Crowd([bench.make_user(i) for i in range(n)], bench.meter), bench.make_reader()
    crowd.go().wait_first_tokens()
    read = threading.Thread(target=reader, daemon=True)
    since = bench.meter.mark()
    read.start()
    with_read = crowd.join()
    c = bench.meter.costs(since)  # while the read ran (the streams' prompts were read before)
    reader.stop.set()
    read.join(600)
    without = itls(alone, after=all_started(alone))
    during = itls(with_read, after=max(all_started(with_read), reader.t0), before=reader.t1)
    base, with_p95 = percentile(without, 0.95), percentile(during, 0.95)
    same = all(s.tokens == bench.solo_reply(i).tokens for run in (alone, with_read) for i, s in enumerate(run))
    return {
        "model": bench.name, "streams": n, "prefill_budget": budget, "doc_tokens": reader.total_tokens,
        "doc_tokens_read": reader.done_tokens, "read_finished": reader.finished, "read_s": reader.t1 - reader.t0,
        "read_tok_s_during_decode": reader.done_tokens / max(reader.t1 - reader.t0, 1e-9),
        "read_alone_tok_s": read_alone(bench, 3.0),
        "p95_itl_without_s": base, "p95_itl_with_s": with_p95, "ratio": with_p95 / base,
        "p50_itl_without_s": percentile(without, 0.5), "p50_itl_with_s": percentile(during, 0.5),
        "max_itl_with_s": max(during, default=0.0), "itl_samples_without": len(without),
        "itl_samples_with": len(during), "identical_to_solo": same,
        "errors": sum(s.error is not None for s in [*alone, *with_read]),
        "step_ms_with": c["step_ms"], "prefill_ms_per_step_with": 1e3 * c["prefill_s"] / max(c["steps"], 1),
        "cpu_share_with": c["cpu_share"], "step_cpu_ms_without": alone_costs["step_cpu_ms"],
        "step_cpu_ms_with": c["step_cpu_ms"], "piece_cpu_ms": c["piece_cpu_ms"],
        "pieces_per_step": c["pieces"] / max(c["steps"], 1),
        "own_core_ratio": c["iteration_cpu_ms"] / alone_costs["step_cpu_ms"],
    }


def random_ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    """[1, n] token ids, the same for the same seed."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def first_token(sched: Scheduler, ids: torch.Tensor, max_new: int,
                on_first: Callable[[], None] = lambda: None) -> tuple[float, list[int]]:
    """(seconds from the call to the first token, the reply's tokens) of one request (greedy);
    on_first() runs at the first token."""
    t0, first, out = time.perf_counter(), None, []
    for ev in sched.stream(sched.engine.new_state(), ids, SamplingParams(), max_new):
        if isinstance(ev, TokenEvent):
            if first is None:
                first = time.perf_counter() - t0
                on_first()
            out.append(ev.token_id)
    return first, out


class Decoder:
    """A row that decodes until stop is set (a random-weight model never ends by itself), then closes."""

    def __init__(self, sched: Scheduler, ids: torch.Tensor):
        self.sched, self.ids, self.stop, self.first = sched, ids, threading.Event(), threading.Event()
        self.tokens, self.error = 0, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            handle = self.sched.stream(self.sched.engine.new_state(), self.ids, SamplingParams(), 1 << 30)
            for ev in handle:
                if isinstance(ev, TokenEvent):
                    self.tokens += 1
                    self.first.set()
                    if self.stop.is_set():
                        break
            handle.close()
        except Exception as e:  # counted and reported, never hidden
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.first.set()


def short_during_long_read(bench: Bench, streams: int, long_tokens: int, short_tokens: int = 20,
                           max_new: int = 8, idle_runs: int = 3) -> dict:
    """Time to first token of a short prompt sent while another request's long prompt is being read
    and `streams` rows decode, against the same prompt's time to first token on an idle model.
    Straight to the model's scheduler (Scheduler.stream / Scheduler.prefill), so only the serving
    policy is measured: how long the short prompt waits behind the long read."""
    sched = bench.scheduler
    vocab = sched.engine.config.vocab_size
    short = random_ids(vocab, short_tokens, 7)
    idle = [first_token(sched, short, max_new) for _ in range(idle_runs)]
    idle_ttft = statistics.median(t for t, _ in idle)
    decoders = [Decoder(sched, random_ids(vocab, 24 + i % 17, 2000 + i)) for i in range(streams)]
    for d in decoders:
        d.first.wait(600)
    ids = random_ids(vocab, long_tokens, 9)
    reader = Reader(lambda progress: sched.prefill(sched.engine.new_state(), ids, progress))
    read = threading.Thread(target=reader, daemon=True)
    read.start()
    end = time.perf_counter() + 600
    while reader.done_tokens == 0 and read.is_alive() and time.perf_counter() < end:
        time.sleep(0.005)  # sent once the read is under way
    sent_at, at_first = reader.done_tokens, {}
    busy_ttft, tokens = first_token(sched, short, max_new, lambda: at_first.update(
        tokens=reader.done_tokens, reading=read.is_alive()))
    reader.stop.set()
    read.join(600)
    for d in decoders:
        d.stop.set()
    for d in decoders:
        d.thread.join(600)
    return {
        "model": bench.name, "streams": streams, "long_prompt_tokens": long_tokens,
        "short_prompt_tokens": short_tokens,
        "prefill_budget": sched.prefill_budget, "ttft_idle_s": idle_ttft, "ttft_during_read_s": busy_ttft,
        "ratio": busy_ttft / idle_ttft, "long_read_tokens_when_sent": sent_at,
        "long_read_tokens_at_first_token": at_first["tokens"],
        "long_read_finished_first": not at_first["reading"],
        "same_tokens_as_idle": all(toks == tokens for _, toks in idle),
        "errors": sum(d.error is not None for d in decoders),
        "decoded_tokens": sum(d.tokens for d in decoders),
    }


def context_decode_engine(bench: Bench, contexts: tuple[int, ...], new_tokens: int, runs: int = 2) -> dict:
    """Decode tok/s of one request after `contexts` tokens of prompt, straight to the scheduler
    (a Request of token ids): a recurrent model's step does not depend on the context, and nothing
    in the serving path should either. The better of `runs` counts (the machine's load moves it)."""
    sched = bench.scheduler
    rates = {}
    for ctx in contexts:
        ids = random_ids(sched.engine.config.vocab_size, ctx + 1, 11)[0].tolist()
        best = 0.0
        for _ in range(runs):
            events = list(sched.submit(Request(ids, max_new_tokens=new_tokens, cache=False)).tokens())
            best = max(best, events[-1].metrics.decode_tok_s)
        rates[str(ctx)] = best
    return {"model": bench.name, "contexts": list(contexts), "new_tokens": new_tokens, "decode_tok_s": rates,
            "ratio_to_0": {k: v / rates[str(contexts[0])] for k, v in rates.items()}}


# -- through the app's HTTP server ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(settings: Settings):
    """The app (Gradio and /v1) on 127.0.0.1 at a free port, in this process: its base URL."""
    from fm_demo.ui import build_demo, launch_kwargs, queue_kwargs

    demo = build_demo(settings).queue(**queue_kwargs(settings))
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
        _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                quiet=True, **launch_kwargs(settings))
    try:
        yield url.rstrip("/")
    finally:
        with contextlib.redirect_stdout(sys.stderr):
            demo.close()


@dataclass
class Reply:
    text: str = ""
    tokens: int = 0  # new tokens
    prompt_tokens: int = 0
    t_start: float = 0.0
    t_first: float = 0.0  # perf_counter at the first piece of text
    t_last: float = 0.0  # at the last piece of text
    t_end: float = 0.0


def at_once(fn: Callable[[int], Reply], n: int) -> tuple[list[Reply], float]:
    """fn(0..n-1) on n threads released together: the replies and the wall time to the last one."""
    gate = threading.Barrier(n)

    def run(i: int) -> Reply:
        gate.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(run, range(n)))
    return replies, max(r.t_end for r in replies) - min(r.t_start for r in replies)


def one_by_one(fn: Callable[[int], Reply], n: int) -> tuple[list[Reply], float]:
    replies = [fn(i) for i in range(n)]
    return replies, sum(r.t_end - r.t_start for r in replies)


def compare_runs(fn_for: Callable[[str], Callable[[int], Reply]], n: int) -> dict:
    """The same n requests one by one, then all at once: aggregate tok/s of each, their ratio, and
    whether every reply at once equals its one-by-one reply."""
    solo, solo_wall = one_by_one(fn_for("solo"), n)
    crowd, crowd_wall = at_once(fn_for("crowd"), n)
    tokens = sum(r.tokens for r in crowd)
    agg, solo_agg = tokens / crowd_wall, sum(r.tokens for r in solo) / solo_wall
    return {"users": n, "concurrent_agg_tok_s": agg, "one_by_one_agg_tok_s": solo_agg, "ratio": agg / solo_agg,
            "concurrent_wall_s": crowd_wall, "one_by_one_wall_s": solo_wall, "tokens": tokens,
            "min_new_tokens": min(r.tokens for r in [*crowd, *solo]),
            "ttft_concurrent_s": statistics.median(r.t_first - r.t_start for r in crowd),
            "ttft_one_by_one_s": statistics.median(r.t_first - r.t_start for r in solo),
            "identical_to_solo": all(a.text == b.text for a, b in zip(crowd, solo)),
            "mismatched_users": [i for i, (a, b) in enumerate(zip(crowd, solo)) if a.text != b.text]}


def gradio_user(url: str, preset: str, max_new: int, n: int) -> Callable[[str], Callable[[int], Reply]]:
    """User i of a run: a gradio_client Client of its own (a fresh session: a new conversation),
    opened before the clock starts, sending user_message(i) to /chat; its tokens from /stats."""
    from gradio_client import Client

    def for_run(run: str) -> Callable[[int], Reply]:
        clients = [Client(url, verbose=False) for _ in range(n)]

        def send(i: int) -> Reply:
            c, r = clients[i], Reply()
            r.t_start = time.perf_counter()
            job = c.submit(user_message(i), max_new_tokens=max_new, preset=preset, api_name="/chat")
            for _ in job:  # partial replies as they stream
                r.t_first = r.t_first or time.perf_counter()
            r.text = job.result()
            r.t_end = r.t_last = time.perf_counter()
            r.t_first = r.t_first or r.t_end
            r.tokens = c.predict(api_name="/stats")["last_reply"]["new_tokens"]
            return r

        return send

    return for_run


def v1_stream(url: str, model: str, content: str, max_new: int, salt: str) -> Reply:
    """One streamed /v1/chat/completions request (the official openai client), greedy."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1800)
    r = Reply(t_start=time.perf_counter())
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_new, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"cache_salt": salt})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            r.t_last = time.perf_counter()
            r.t_first = r.t_first or r.t_last
            r.text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            r.tokens, r.prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
    r.t_end = time.perf_counter()
    return r


def http_section(args: argparse.Namespace, path: Path, name: str) -> dict:
    """The app's server over HTTP with the random-weight model `name` (checkpoint `path`)."""
    from transformers import AutoTokenizer

    n, max_new = args.http_users, args.max_new_tokens
    settings = Settings(device="cpu", extra_models=(f"{path}:instruct",), default_preset=name,
                        max_new_tokens=max_new, max_new_tokens_cap=max(2048, max_new, args.context_decode_tokens),
                        max_batch=max(n, 8), max_upload_chars=10_000_000, cpu_threads=args.threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    out: dict = {"model": name, "users": n, "max_new_tokens": max_new}
    with app_server(settings) as url:
        v1_stream(url, name, "Hello!", 2, "warm-up")  # loads the model: no run times the load
        out["gradio"] = compare_runs(gradio_user(url, name, max_new, n), n)
        out["v1"] = compare_runs(lambda run: (lambda i: v1_stream(url, name, user_message(i), max_new,
                                                                    f"{run}-{i}-{time.time_ns()}")), n)
        rates, prompts = {}, {}
        for ctx in args.contexts:
            text = (document(tokenizer, ctx) + "\n\n" if ctx else "") + user_message(0)
            salt = f"context-{ctx}-{time.time_ns()}"
            # twice with one salt: the second finds the prompt's state in the cache; the better
            # decode rate of the two counts (one stream's rate moves with the machine's load)
            got = [v1_stream(url, name, text, args.context_decode_tokens, salt) for _ in range(2)]
            rates[str(ctx)] = max((r.tokens - 1) / max(r.t_last - r.t_first, 1e-9) for r in got)
            prompts[str(ctx)] = got[0].prompt_tokens
        out["context_decode"] = {"contexts": list(args.contexts), "new_tokens": args.context_decode_tokens,
                                 "decode_tok_s": rates, "prompt_tokens": prompts,
                                 "ratio_to_0": {k: v / rates[str(args.contexts[0])] for k, v in rates.items()}}
    return out


# -- building the models -------------------------------------------------------------------------
def random_checkpoint(name: str, out: Path, seed: int = 0) -> tuple[Path, int]:
    """A random-weight Falcon Mamba of SHAPES[name] with the bundled tokenizer, saved to out/name."""
    from transformers import AutoTokenizer, FalconMambaForCausalLM

    from fm_demo.tiny.config import falcon_mamba_config

    path = out / name
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("instruct"))
    torch.manual_seed(seed)
    model = FalconMambaForCausalLM(falcon_mamba_config(TinyDims(**SHAPES[name][0]), "instruct"))
    with torch.no_grad():  # special tokens (the stop tokens among them) get logit 0, which never wins
        model.lm_head.weight[tokenizer.all_special_ids] = 0.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def settings_for(args: argparse.Namespace, budget: int | None = None) -> Settings:
    # every user gets a row: none waits or is refused
    rows = max(*args.streams, args.interference_streams + 1, args.short_streams + 2)
    return Settings(device=args.device, max_new_tokens=args.max_new_tokens, max_batch=rows,
                    prefill_budget=args.prefill_budget if budget is None else budget,
                    max_new_tokens_cap=max(2048, args.max_new_tokens))


def chat_models(args: argparse.Namespace, tmp: Path):
    """(name, make_bench(budget)) for each model of --models, through ModelManager presets."""
    for name in args.models:
        path, params = random_checkpoint(name, tmp)
        preset = Preset(name, name, str(path), "instruct", ("fp32",), "fp32")
        info = {"checkpoint": f"{SHAPES[name][1]}, bundled tokenizer, instruct format", "params": params,
                "dtype": "fp32"}

        def make(budget: int | None, name=name, preset=preset, info=info) -> tuple[Bench, Settings]:
            settings = settings_for(args, budget)
            lm = ModelManager(settings, presets={name: preset}).get(name)
            return chat_bench(name, lm, settings, args.max_new_tokens, args.doc_tokens, info), settings

        yield name, make


def row_models(args: argparse.Namespace):
    """The one model of --config, random weights in --dtype, served by a bare Scheduler."""
    from kernels_check.models import build_random_model

    config = load_config(args.config)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = build_random_model(config, args.device, dtype)
    engine = Engine(model)
    name = f"{Path(args.config).name.split('.')[0]}-{args.dtype}"
    info = {"checkpoint": f"random weights of {args.config}, no tokenizer (token-id requests)",
            "params": sum(p.numel() for p in model.parameters()), "dtype": args.dtype}

    def make(budget: int | None) -> tuple[Bench, Settings]:
        settings = settings_for(args, budget)
        sched = Scheduler(engine, settings.batch_size_limit(), settings.prefill_budget_tokens(),
                          settings.batch_waiting_limit(), name=name)
        return row_bench(name, sched, args.max_new_tokens, args.doc_tokens, info), settings

    yield name, make


def load_config(spec: str):
    """A FalconMambaConfig from a config.json path, or a SHAPES name."""
    from transformers import FalconMambaConfig

    from fm_demo.tiny.config import falcon_mamba_config

    if spec in SHAPES:
        return falcon_mamba_config(TinyDims(**SHAPES[spec][0]), "instruct")
    fields = json.loads(Path(spec).read_text())
    fields.pop("architectures", None)
    fields.pop("torch_dtype", None)
    return FalconMambaConfig(**fields)


# -- the run -------------------------------------------------------------------------------------
def warm_up(bench: Bench, n: int, largest: int) -> None:
    """One crowd of n users (allocator, first calls), and on CUDA a graph captured for every
    decode bucket up to `largest` rows, so no run pays for a capture."""
    run_crowd(bench, range(n))
    engine = bench.meter.engine
    if engine.device.type == "cuda":
        for b in sorted({engine.decode_bucket(n) for n in range(1, largest + 1)}):
            bench.meter.step_ms(b, reps=1)


def targets(out: dict) -> dict:
    rows = {}
    for name, m in out["models"].items():
        one, sixteen = m["streams"].get("1", {}), m["streams"].get("16", {})
        if "agg_tok_s" in one and "agg_tok_s" in sixteen:
            agg = sixteen["agg_tok_s"] / one["agg_tok_s"]
            itl = sixteen["p95_itl_s"] / one["p95_itl_s"]
            rows[f"{name}: agg tok/s N=16 / N=1 >= {TARGETS['agg_16_over_1_min']:g}"] = {
                "ratio": round(agg, 2), "met": agg >= TARGETS["agg_16_over_1_min"],
                "per_cpu_s_ratio": round(sixteen["agg_tok_per_cpu_s"] / one["agg_tok_per_cpu_s"], 2),
                "engine_step_ratio": round(m.get("engine_agg_16_over_1", float("nan")), 2)}
            rows[f"{name}: p95 ITL N=16 / N=1 <= {TARGETS['p95_itl_16_over_1_max']:g}"] = {
                "ratio": round(itl, 2), "met": itl <= TARGETS["p95_itl_16_over_1_max"],
                "own_core_ratio": round(sixteen["loop_cpu_ms"] / one["loop_cpu_ms"], 2)}
    for name, r in out["prefill_interference"].get("by_model", {}).items():
        if "ratio" not in r:
            continue
        rows[f"{name}: p95 ITL with read / without <= {TARGETS['p95_itl_read_over_none_max']:g}"] = {
            "ratio": round(r["ratio"], 2), "met": r["ratio"] <= TARGETS["p95_itl_read_over_none_max"],
            "own_core_ratio": round(r["own_core_ratio"], 2)}
    return rows


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    deadline = time.perf_counter() + args.deadline_s
    out = {"device": args.device, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
           "sampling": "greedy", "path": "scheduler rows (token ids)" if args.rows else
           "Conversation.send through ModelManager and the batched runner", "models": {},
           "prefill_interference": {"by_model": {}}}
    short_model = args.interference_model if args.interference_model in args.models else args.models[0]
    with tempfile.TemporaryDirectory() as tmp:
        models = row_models(args) if args.rows else chat_models(args, Path(tmp))
        for name, make in models:
            t0 = time.perf_counter()
            bench, settings = make(None)
            budget = settings.prefill_budget_tokens()
            out.update(max_batch=settings.batch_size_limit(), prefill_budget=budget)
            warm_up(bench, min(max(args.streams), 8), max(args.streams))
            out["models"][name] = sweep(bench, args.streams, args.solo_runs, args.solo_check, deadline)
            n = args.interference_streams
            if time.perf_counter() > deadline:
                out["prefill_interference"]["by_model"][name] = {"skipped": "past --deadline-s"}
                bench.close()
                continue
            alone = run_crowd(bench, range(n))
            out["prefill_interference"]["by_model"][name] = interference(bench, n, budget, alone)
            if args.rows or name == short_model:
                out["short_during_long_read"] = short_during_long_read(bench, args.short_streams,
                                                                       args.long_prompt_tokens)
                out["context_decode_engine"] = context_decode_engine(bench, args.contexts, args.context_decode_tokens)
            for b in args.budgets:
                if time.perf_counter() > deadline:
                    break
                other, _ = make(b)
                other.solo = bench.solo
                out["prefill_interference"].setdefault("budget_sweep", {}).setdefault(name, {})[str(b)] = \
                    interference(other, n, b, alone)
                other.close()
            bench.close()
            out["models"][name]["seconds"] = time.perf_counter() - t0
        if args.rows or args.skip_http:
            out["http"] = {"skipped": "--rows: no app server" if args.rows else "--skip-http"}
        else:
            t0 = time.perf_counter()
            path, _ = random_checkpoint(args.http_model, Path(tmp) / "http")
            out["http"] = {**http_section(args, path, args.http_model), "seconds": time.perf_counter() - t0}
    by_model = out["prefill_interference"]["by_model"]
    pick = args.interference_model if args.interference_model in by_model else name
    out["prefill_interference"].update(by_model[pick])
    out.setdefault("short_during_long_read", {"skipped": "past --deadline-s"})
    out.setdefault("context_decode_engine", {"skipped": "past --deadline-s"})
    out["targets"] = targets(out)
    return out


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=lambda t: t.split(","), default=list(SHAPES), help=", ".join(SHAPES))
    p.add_argument("--streams", type=ints, default=STREAMS, help="concurrent users per run, comma separated")
    p.add_argument("--quick", action="store_true", help="a smoke run in about a minute: " + " ".join(
        f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, tuple) else v}"
        for k, v in QUICK.items()))
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--doc-tokens", type=int, default=16_384, help="tokens of the document read")
    p.add_argument("--interference-streams", type=int, default=8)
    p.add_argument("--interference-model", default="tiny-shape", help="whose read figures lead the JSON")
    p.add_argument("--prefill-budget", type=int, default=0, help="0: the Settings default for the device")
    p.add_argument("--budgets", type=ints, default=(), help="also read the document at these budgets")
    p.add_argument("--solo-runs", type=int, default=4, help="solo replies whose median is the N=1 figure")
    p.add_argument("--solo-check", type=int, default=1 << 30, help="users whose solo reply is checked")
    p.add_argument("--deadline-s", type=float, default=1200, help="start no new N after this many seconds")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--rows", action="store_true", help="token-id requests straight to a Scheduler (see above)")
    p.add_argument("--config", default="tiny-shape", help="--rows: a config.json or a name of " + ", ".join(SHAPES))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="--rows: weights' dtype")
    p.add_argument("--short-streams", type=int, default=8, help="rows decoding while the long prompt is read")
    p.add_argument("--long-prompt-tokens", type=int, default=65_536,
                   help="the long prompt read while a short one is sent")
    p.add_argument("--http-model", default="random-22m", choices=list(SHAPES),
                   help="the model the app serves (quick: tiny-shape)")
    p.add_argument("--http-users", type=int, default=16, help="users at once through HTTP")
    p.add_argument("--contexts", type=ints, default=(0, 8192, 32768),
                   help="context tokens before one /v1 stream's decode rate is measured")
    p.add_argument("--context-decode-tokens", type=int, default=128, help="new tokens of that stream")
    p.add_argument("--skip-http", action="store_true", help="leave out the app server over HTTP")
    p.add_argument("--json", action="store_true", help="print one JSON object (targets go to stderr)")
    args = p.parse_args(argv)
    if args.quick:  # quick values where the flag was left at its default
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    args.solo_runs = min(args.solo_runs, max(args.streams), args.solo_check)
    out = run(args)
    for line, r in out["targets"].items():
        print(f"{'met   ' if r['met'] else 'MISSED'} {line}: {r['ratio']}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    for name, m in out["models"].items():
        print(f"{name} ({m['params'] / 1e6:.1f}M, {m['dtype']}): identical to solo: {m['identical_to_solo']}")
        for n, r in m["streams"].items():
            if "agg_tok_s" in r:
                print(f"  N={n:>3} agg {r['agg_tok_s']:8.1f} tok/s  per stream {r['per_stream_tok_s']:7.1f}  "
                      f"ITL p50 {r['p50_itl_s'] * 1e3:7.1f} ms p95 {r['p95_itl_s'] * 1e3:7.1f} ms  "
                      f"TTFT {r['ttft_s'] * 1e3:7.1f} ms")
    for name, r in out["prefill_interference"]["by_model"].items():
        if "ratio" not in r:
            continue
        print(f"{name}: read while {r['streams']} decode: p95 ITL {r['p95_itl_without_s'] * 1e3:.1f} -> "
              f"{r['p95_itl_with_s'] * 1e3:.1f} ms ({r['ratio']:.2f}x)")
    r = out["short_during_long_read"]
    if "ratio" in r:
        print(f"{r['model']}: a {r['short_prompt_tokens']}-token prompt while {r['long_prompt_tokens']} "
              f"tokens are read and {r['streams']} decode: TTFT {r['ttft_idle_s'] * 1e3:.1f} -> "
              f"{r['ttft_during_read_s'] * 1e3:.1f} ms ({r['ratio']:.1f}x)")
    h = out["http"]
    for kind in ("gradio", "v1"):
        if kind in h:
            r = h[kind]
            print(f"HTTP {kind}: {r['users']} users at once {r['concurrent_agg_tok_s']:.1f} tok/s, "
                  f"one by one {r['one_by_one_agg_tok_s']:.1f} ({r['ratio']:.2f}x), identical: {r['identical_to_solo']}")
    if "context_decode" in h:
        print("HTTP /v1 decode tok/s by context: " + ", ".join(
            f"{k}: {v:.1f} ({h['context_decode']['ratio_to_0'][k]:.2f}x)"
            for k, v in h["context_decode"]["decode_tok_s"].items()))


if __name__ == "__main__":
    main()
