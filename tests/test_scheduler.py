"""The batched scheduler: every row gets what it would get alone, whatever else is in the batch.

"Alone" is the same scheduler serving that one request. Prompts are read by the same batch-1
prefill in the same pieces, so reads are identical; decode steps run at another batch size, whose
matmul kernels may round differently in the last bits (MKL takes a GEMV path for one row). So:
greedy tokens identical, states equal to fp32 rounding (STATE_ATOL), seeded samples identical.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from fm_demo.engine import Engine, SamplingParams, tiny_model
from fm_demo.serving import Progress, Scheduler, SchedulerBusy, SchedulerClosed

STATE_ATOL = 1e-5
CONFIGS = {
    "h64-l2": dict(hidden_size=64, num_hidden_layers=2),
    "h128-l3-n8-k3": dict(hidden_size=128, num_hidden_layers=3, state_size=8, conv_kernel=3),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def engine(request):
    return Engine(tiny_model(seed=3, **CONFIGS[request.param]), chunk_size=16)


def make_rows(n: int, seed: int, vocab: int = 512) -> list[tuple[torch.Tensor, int]]:
    rng = random.Random(seed)
    return [(torch.randint(0, vocab, (1, rng.randint(1, 40)), generator=torch.Generator().manual_seed(seed * 100 + i)),
             rng.randint(1, 24)) for i in range(n)]


def collect(handle) -> list[int]:
    return [ev.token_id for ev in handle if not isinstance(ev, Progress)]


def solo(engine, ids, max_new, sampling=SamplingParams(), stops=()):
    """(tokens, state) of the request served alone by a fresh scheduler."""
    sched = Scheduler(engine, max_batch=4, prefill_budget=8)
    try:
        state = engine.new_state()
        return collect(sched.stream(state, ids, sampling, max_new, stops)), state
    finally:
        sched.close()


def run_concurrently(sched, engine, rows, samplings, order, stop_after=None):
    """Submit rows in `order`, staggered (each new row joins while earlier ones decode), all consumed
    on their own threads; stop_after[i] closes row i after that many tokens."""
    stop_after = stop_after or {}
    states = [engine.new_state() for _ in rows]
    tokens: list[list[int] | None] = [None] * len(rows)
    started = [threading.Event() for _ in rows]

    def consume(i):
        handle = sched.stream(states[i], rows[i][0], samplings[i], rows[i][1])
        started[i].set()
        got = []
        for ev in handle:
            got.append(ev.token_id)
            if stop_after.get(i) == len(got):
                got += [e.token_id for e in handle.close()]  # fed before the stop landed
                break
        tokens[i] = got

    threads = []
    for i in order:
        t = threading.Thread(target=consume, args=(i,))
        t.start()
        started[i].wait(10)
        threads.append(t)
    for t in threads:
        t.join(60)
    return tokens, states


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_greedy_rows_equal_their_solo_replies(engine, seed):
    rows = make_rows(7, seed)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    sched = Scheduler(engine, max_batch=4, prefill_budget=8, max_waiting=8)  # 7 rows: some wait for a row
    try:
        tokens, states = run_concurrently(sched, engine, rows, [SamplingParams()] * len(rows), order)
        assert sched.stats()["steps"] < sum(n for _, n in rows)  # rows really shared steps
    finally:
        sched.close()
    for (ids, max_new), got, state in zip(rows, tokens, states):
        want, want_state = solo(engine, ids, max_new)
        assert got == want and len(got) == max_new
        assert state.seqlen == want_state.seqlen == ids.shape[1] + max_new
        torch.testing.assert_close(state.ssm, want_state.ssm, atol=STATE_ATOL, rtol=0)
        torch.testing.assert_close(state.conv, want_state.conv, atol=STATE_ATOL, rtol=0)
        # and what the engine's own batch-1 stream gives, read in other chunks
        alone = [ev.token_id for ev in engine.stream(ids, engine.new_state(), SamplingParams(), max_new)]
        assert got == alone


def test_seeded_sampling_per_row_does_not_depend_on_the_batch(engine):
    rows = make_rows(5, seed=7)
    samplings = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, repetition_penalty=1.2, seed=10 + i)
                 for i in range(len(rows))]
    sched = Scheduler(engine, max_batch=8, prefill_budget=8)
    try:
        tokens, _ = run_concurrently(sched, engine, rows, samplings, [4, 2, 0, 3, 1])
    finally:
        sched.close()
    for (ids, max_new), sampling, got in zip(rows, samplings, tokens):
        assert got == solo(engine, ids, max_new, sampling)[0]


def test_stopped_rows_keep_exact_states_and_leave_others_untouched(engine):
    rows = [(ids, 20) for ids, _ in make_rows(4, seed=3)]
    sched = Scheduler(engine, max_batch=4, prefill_budget=8)
    try:
        tokens, states = run_concurrently(sched, engine, rows, [SamplingParams()] * 4, [0, 1, 2, 3],
                                          stop_after={1: 3, 2: 1})
    finally:
        sched.close()
    for i, ((ids, max_new), got, state) in enumerate(zip(rows, tokens, states)):
        want, _ = solo(engine, ids, max_new)
        if i in (1, 2):  # stopped: a prefix of the solo reply, and the state holds exactly it
            assert got == want[:len(got)] and len(got) < max_new
            assert state.seqlen == ids.shape[1] + len(got)
            ref = engine.new_state()
            engine.prefill(torch.cat([ids, torch.tensor([got])], dim=1), ref)
            torch.testing.assert_close(state.ssm, ref.ssm, atol=1e-4, rtol=0)
        else:
            assert got == want


def test_stop_tokens_end_a_row_after_feeding_it(engine):
    ids, _ = make_rows(1, seed=11)[0]
    free, _ = solo(engine, ids, 12)
    stop = free[4]
    got, state = solo(engine, ids, 12, stops=[stop])
    assert got == free[:free.index(stop) + 1] and state.seqlen == ids.shape[1] + len(got)


def test_full_batch_and_queue_refuse_at_once_and_keep_serving(engine):
    sched = Scheduler(engine, max_batch=2, prefill_budget=8, max_waiting=1)
    try:
        ids = torch.randint(0, 512, (1, 5))
        handles = [sched.stream(engine.new_state(), ids, SamplingParams(), 200) for _ in range(3)]
        with pytest.raises(SchedulerBusy, match="busy"):
            sched.stream(engine.new_state(), ids, SamplingParams(), 5)
        assert sched.stats()["busy_refusals"] == 1
        for h in handles:
            h.close()
        assert len(collect(sched.stream(engine.new_state(), ids, SamplingParams(), 5))) == 5
        with pytest.raises(ValueError, match="token ids must be in"):  # a bad request, refused in the caller
            sched.stream(engine.new_state(), torch.tensor([[10_000]]), SamplingParams(), 5)
        assert len(collect(sched.stream(engine.new_state(), ids, SamplingParams(), 3))) == 3
    finally:
        sched.close()


def test_prefill_reports_progress_and_a_raising_callback_stops_the_read(engine):
    sched = Scheduler(engine, max_batch=2, prefill_budget=8)
    try:
        ids = torch.randint(0, 512, (1, 50), generator=torch.Generator().manual_seed(5))
        seen = []
        state = sched.prefill(engine.new_state(), ids, lambda d, t: seen.append((d, t)))
        assert seen == [(d, 50) for d in (8, 16, 24, 32, 40, 48, 50)] and state.seqlen == 50
        ref = engine.new_state()
        engine.prefill(ids, ref)
        torch.testing.assert_close(state.ssm, ref.ssm, atol=STATE_ATOL, rtol=0)

        def stop_at_16(done, total):
            if done >= 16:
                raise KeyboardInterrupt("stop")

        partial = engine.new_state()
        with pytest.raises(KeyboardInterrupt):
            sched.prefill(partial, ids, stop_at_16)
        assert 16 <= partial.seqlen < 50  # stopped between pieces, without reading the rest
        assert sched.stats()["active_rows"] == 0
    finally:
        sched.close()


def test_a_long_read_is_interleaved_with_decoding_rows(engine):
    """While one request reads 400 tokens, a decoding row gets a token every iteration."""
    sched = Scheduler(engine, max_batch=4, prefill_budget=8)
    try:
        row = sched.stream(engine.new_state(), torch.tensor([[1, 2, 3]]), SamplingParams(), 60)
        next(iter(row))
        doc = torch.randint(0, 512, (1, 400))
        read = threading.Thread(target=sched.prefill, args=(engine.new_state(), doc))
        before = sched.stats()["prefill_tokens"]
        read.start()
        got = 1 + len(collect(row))
        read.join(30)
        assert got == 60 and sched.stats()["prefill_tokens"] - before == 400
        # the read took 50 iterations of 8 tokens; the row's 59 steps ran alongside, not after
        assert sched.stats()["steps"] >= 59
    finally:
        sched.close()


def test_closing_ends_waiting_and_running_requests_with_a_clear_error(engine):
    sched = Scheduler(engine, max_batch=1, prefill_budget=8, max_waiting=2)
    running = sched.stream(engine.new_state(), torch.tensor([[1, 2]]), SamplingParams(), 500)
    waiting = sched.stream(engine.new_state(), torch.tensor([[1, 2]]), SamplingParams(), 5)
    next(iter(running))
    sched.close()
    for h in (running, waiting):
        with pytest.raises(SchedulerClosed, match="unloaded"):
            collect(h)
    with pytest.raises(SchedulerClosed):
        sched.stream(engine.new_state(), torch.tensor([[1]]), SamplingParams(), 1)
