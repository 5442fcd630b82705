"""One request lifecycle in the scheduler: reuse at every kind of kept state, fault isolation,
fair reading, cancellation during a read, and a plan that can be tested without threads.

Exactness: a request resumed from any kept state (a turn end, a message boundary, a checkpoint
inside a long prompt) gives the greedy tokens of the same request read from scratch, and its
end state agrees with the scratch one to fp32 rounding (different prefill cuts round differently).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fm_demo.engine import Engine, SamplingParams, tiny_model
from fm_demo.serving import (FRESH, HIT, REBUILT, Progress, Request, RequestFailed, Scheduler)
from fm_demo.serving import scheduler as scheduler_module
from fm_demo.serving.plan import plan
from fm_demo.serving.prefix_cache import PrefixCache

pytestmark = pytest.mark.usefixtures("one_thread")
STATE_ATOL = 1e-4
VOCAB = 512


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model(seed=5, hidden_size=64, num_hidden_layers=2), chunk_size=16)


@pytest.fixture
def cache():
    return PrefixCache(budget_bytes=1 << 30)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(sched: Scheduler, req: Request) -> tuple[list[int], object]:
    reply = sched.submit(req)
    out = [ev.token_id for ev in reply.tokens()]
    return out, reply


def scratch(engine: Engine, prompt: list[int], max_new: int) -> tuple[list[int], object]:
    """The same request read from the empty state by a scheduler with no cache."""
    sched = Scheduler(engine, max_batch=4, prefill_budget=8)
    try:
        return run(sched, Request(prompt, max_new_tokens=max_new, cache=False))
    finally:
        sched.close()


def close_states(a, b) -> bool:
    return a.seqlen == b.seqlen and torch.allclose(a.ssm, b.ssm, atol=STATE_ATOL) and torch.allclose(
        a.conv, b.conv, atol=STATE_ATOL)


@pytest.fixture
def sched(engine, cache):
    s = Scheduler(engine, max_batch=4, prefill_budget=8, cache=cache, checkpoint_tokens=64)
    yield s
    s.close()


# -- reuse at every kind of kept state -------------------------------------------------------------
def test_a_message_boundary_is_reused_and_exact(engine, sched):
    system = tokens(90, 1)
    first = system + tokens(12, 2)
    _, r1 = run(sched, Request(first, "ns", max_new_tokens=6, keep_at=(len(system),)))
    assert r1.source == FRESH and r1.start == 0
    second = system + tokens(15, 3)
    got, r2 = run(sched, Request(second, "ns", max_new_tokens=6, keep_at=(len(system),)))
    assert r2.source == HIT and r2.start == len(system)  # the boundary, not a checkpoint before it
    want, w = scratch(engine, second, 6)
    assert got == want and close_states(r2.end_state, w.end_state)


def test_a_checkpoint_inside_a_long_prompt_is_reused_and_exact(engine, sched):
    doc = tokens(300, 4)
    _, r1 = run(sched, Request(doc + tokens(10, 5), "ns", max_new_tokens=4))
    second = doc + tokens(10, 6)
    got, r2 = run(sched, Request(second, "ns", max_new_tokens=4))
    assert r2.source == HIT and r2.start == 256  # the last multiple of 64 inside the shared part
    want, w = scratch(engine, second, 4)
    assert got == want and close_states(r2.end_state, w.end_state)
    assert sched.cache.stats()["checkpoint_bytes"] > 0


def test_the_tail_checkpoint_serves_a_question_after_a_long_document(engine, engine_cache=None):
    cache = PrefixCache(budget_bytes=1 << 30)
    sched = Scheduler(engine, max_batch=4, prefill_budget=8, cache=cache, checkpoint_tokens=4096)
    try:
        doc = tokens(700, 7)
        run(sched, Request(doc + tokens(20, 8), "ns", max_new_tokens=3))
        got, r2 = run(sched, Request(doc + tokens(25, 9), "ns", max_new_tokens=3))
        assert r2.source == HIT and r2.start == 720 - scheduler_module.TAIL_TOKENS  # within the document
        want, _ = scratch(engine, doc + tokens(25, 9), 3)
        assert got == want
    finally:
        sched.close()


def test_a_turn_end_and_the_retry_point_are_reused_and_exact(engine, sched):
    turn1 = tokens(40, 10)
    reply1, r1 = run(sched, Request(turn1, "ns", max_new_tokens=8))
    assert set(r1.kept) == {len(turn1) - 1, len(turn1) + len(reply1)}  # the retry point and the end
    turn2 = [*turn1, *reply1, *tokens(9, 11)]
    got, r2 = run(sched, Request(turn2, "ns", max_new_tokens=8, expect=len(turn1) + len(reply1)))
    assert r2.source == HIT and r2.start == len(turn1) + len(reply1) and r2.metrics.prompt_tokens == 9
    want, w = scratch(engine, turn2, 8)
    assert got == want and close_states(r2.end_state, w.end_state)
    again, r3 = run(sched, Request(turn2, "ns", max_new_tokens=8))  # a retry reads one token
    assert again == got and r3.start == len(turn2) - 1


def test_an_evicted_state_is_read_again_and_says_so(engine, cache, sched):
    prompt = tokens(30, 12)
    reply, _ = run(sched, Request(prompt, "ns", max_new_tokens=5))
    cache.drop_namespace("ns")
    nxt = [*prompt, *reply, *tokens(5, 13)]
    got, r = run(sched, Request(nxt, "ns", max_new_tokens=5, expect=len(prompt) + len(reply)))
    assert r.source == REBUILT and r.start == 0
    assert got == scratch(engine, nxt, 5)[0]


def test_checkpoints_are_evicted_before_kept_states(engine):
    one = engine.state_nbytes()
    cache = PrefixCache(budget_bytes=6 * one)
    sched = Scheduler(engine, max_batch=4, prefill_budget=8, cache=cache, checkpoint_tokens=32)
    try:
        for seed in range(3):
            run(sched, Request(tokens(200, 20 + seed), f"ns{seed}", max_new_tokens=2, keep_at=(150,)))
        nodes = [n for n in cache._nodes() if n.state is not None]
        assert cache.nbytes <= cache.budget_bytes and len(nodes) == 6
        assert not any(n.checkpoint for n in nodes)  # every checkpoint went before any kept state
        assert cache.find(tokens(200, 22)[:150], "ns2")[0] == 150  # the newest request's states stay
    finally:
        sched.close()


# -- fault isolation -------------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


def faulty(stage: str, victim: list[int], monkeypatch):
    """Make `stage` raise for the request whose prompt is `victim` (and only for it)."""
    sched = scheduler_module.Scheduler
    if stage == "admission":
        real = sched._admit

        def admit(self, row):
            if row.tokens == victim:
                raise Boom("admission")
            return real(self, row)
        monkeypatch.setattr(sched, "_admit", admit)
    elif stage == "read":
        real = sched._read

        def read(self, row, n):
            if row.tokens == victim and row.read > 0:
                raise Boom("read")
            return real(self, row, n)
        monkeypatch.setattr(sched, "_read", read)
    elif stage in ("sample", "emit"):
        real = sched._prompt_read

        def prompt_read(self, row, logits):
            real(self, row, logits)
            if row.tokens != victim:
                return
            decoder = row.decoder
            if stage == "sample":
                calls = iter(range(100))

                def choose(logits, real_choose=decoder.choose):
                    if next(calls) == 1:
                        raise Boom("sample")
                    return real_choose(logits)
                decoder.choose = choose
            else:
                def emit(*a, real_emit=decoder.emit, **k):
                    if decoder.emitted == 1:
                        raise Boom("emit")
                    return real_emit(*a, **k)
                decoder.emit = emit
        monkeypatch.setattr(sched, "_prompt_read", prompt_read)
    elif stage == "keep":
        real = PrefixCache.insert

        def insert(self, toks, state, namespace="", checkpoint=False):
            if namespace == "ns1":
                raise Boom("keep")
            return real(self, toks, state, namespace, checkpoint)
        monkeypatch.setattr(PrefixCache, "insert", insert)


@pytest.mark.parametrize("stage", ["admission", "read", "sample", "emit", "keep"])
def test_a_fault_ends_that_request_alone_and_every_request_ends(engine, stage, monkeypatch):
    prompts = [tokens(20 + 7 * i, 30 + i) for i in range(4)]
    victim = prompts[1]

    def serve(with_fault: bool) -> list:
        if with_fault:
            faulty(stage, victim, monkeypatch)
        sched = Scheduler(engine, max_batch=4, prefill_budget=8, cache=PrefixCache(1 << 30), checkpoint_tokens=16)
        replies = [sched.submit(Request(p, f"ns{i}", max_new_tokens=10)) for i, p in enumerate(prompts)]
        out = [None] * 4

        def take(i):
            try:
                out[i] = [ev.token_id for ev in replies[i].tokens()]
            except RequestFailed as e:
                out[i] = e
        threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
        [t.start() for t in threads]
        [t.join(timeout=60) for t in threads]
        assert all(r.done.is_set() for r in replies)  # every request ended
        sched.close()
        monkeypatch.undo()
        return out

    clean, hurt = serve(False), serve(True)
    for i in (0, 2, 3):
        assert hurt[i] == clean[i]  # the others go on exactly as they would have
    if stage == "keep":  # keeping a state is best effort: the request itself is served
        assert hurt[1] == clean[1]
    else:
        assert isinstance(hurt[1], RequestFailed) and "Boom" in str(hurt[1])


def test_a_failing_model_step_ends_the_decoding_rows_not_the_scheduler(engine, monkeypatch):
    sched = Scheduler(engine, max_batch=4, prefill_budget=8)
    real, calls = engine.decode_step, iter(range(1000))

    def step(*a, **k):
        if next(calls) == 3:
            raise Boom("device")
        return real(*a, **k)
    monkeypatch.setattr(engine, "decode_step", step)
    try:
        r = sched.submit(Request(tokens(10, 40), max_new_tokens=10, cache=False))
        with pytest.raises(RequestFailed, match="model step failed"):
            list(r.tokens())
        got, _ = run(sched, Request(tokens(10, 41), max_new_tokens=5, cache=False))  # still serving
        assert len(got) == 5
    finally:
        sched.close()


# -- fair reading, cancellation, the plan --------------------------------------------------------------
class Row:
    def __init__(self, read, end, piece=8):
        self.read, self.end, self.start, self.piece = read, end, read, piece

    def cut_after(self, pos):
        return min(self.start + ((pos - self.start) // self.piece + 1) * self.piece, self.end)


def test_plan_reads_shortest_first_in_whole_pieces_while_rows_decode():
    long, short = Row(0, 10_000), Row(0, 20)
    p = plan([long, short], decoding=["d"] * 8, budget=16, chunk=256)
    assert p.reads == [(short, 16)] and p.decode == ["d"] * 8  # the short prompt first; the long waits
    short.read = 16
    p = plan([long, short], decoding=["d"] * 2, budget=16, chunk=256)
    assert p.reads == [(short, 4), (long, 8)]
    p = plan([long, short], decoding=["d"], budget=16, chunk=256)  # two waiting to join one: twice the budget
    assert p.reads == [(short, 4), (long, 24)]
    p = plan([long], decoding=[], budget=16, chunk=256)  # nothing decodes: a chunk per row
    assert p.reads == [(long, 256)]
    p = plan([Row(0, 100, piece=32)], decoding=["d"], budget=16, chunk=256)  # one whole piece regardless
    assert p.reads[0][1] == 32


def test_a_short_prompt_starts_while_a_long_one_reads(engine):
    sched = Scheduler(engine, max_batch=8, prefill_budget=8)
    try:
        streams = [sched.submit(Request(tokens(5, 50 + i), max_new_tokens=400, cache=False)) for i in range(2)]
        [next(iter(s)) for s in streams]
        long = sched.submit(Request(tokens(6000, 60), max_new_tokens=1, progress=True, cache=False))
        next(long)  # reading
        t0 = time.perf_counter()
        short, _ = run(sched, Request(tokens(20, 61), max_new_tokens=1, cache=False))
        waited = time.perf_counter() - t0
        assert not long.done.is_set() and long.read < 6000  # the short one did not wait for the long read
        assert len(short) == 1 and waited < 2.0
        for r in (long, *streams):
            r.close()
    finally:
        sched.close()


def test_cancelling_during_a_read_frees_the_row_within_a_piece(engine):
    sched = Scheduler(engine, max_batch=2, prefill_budget=8)
    try:
        reply = sched.submit(Request(tokens(20_000, 70), max_new_tokens=1, progress=True, cache=False))
        first = next(reply)
        assert isinstance(first, Progress)
        t0 = time.perf_counter()
        reply.close()
        assert time.perf_counter() - t0 < 1.0 and reply.finish_reason == "cancelled"
        assert reply.read < 20_000 and sched.stats()["active_rows"] == 0
    finally:
        sched.close()


def test_the_scheduler_runs_without_its_thread(engine):
    sched = Scheduler(engine, max_batch=2, prefill_budget=8, start=False)
    reply = sched.submit(Request(tokens(12, 80), max_new_tokens=3, cache=False))
    steps = 0
    while not reply.done.is_set():
        assert sched.run_once()
        steps += 1
    assert [ev.token_id for ev in reply.tokens()] == scratch(engine, tokens(12, 80), 3)[0]
    assert steps == 3  # the 12-token read and the first step, then two more steps
    sched.close()
