"""What the API's extra fields do inside the scheduler's rows: log-probabilities of replies and of
prompts, n replies from one read, logit bias, frequency and presence penalties, min_tokens.

Each is checked against a direct computation with the engine (a fresh read of the same tokens),
not against the scheduler's own figures.
"""

from __future__ import annotations

import pytest
import torch

from fm_demo.engine import DecodeOptions, DecodeRow, Engine, SamplingParams, tiny_model
from fm_demo.serving import Request, RequestFailed, Scheduler
from fm_demo.serving.prefix_cache import PrefixCache
from fm_demo.serving.request import FRESH, HIT

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = [5, 17, 99, 3, 42, 7, 250, 11, 64, 8, 31, 2, 77, 19, 140, 6, 23, 88, 4, 51]
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model(seed=5, hidden_size=64, num_hidden_layers=2), chunk_size=8)


@pytest.fixture()
def sched(engine):
    s = Scheduler(engine, max_batch=8, prefill_budget=8, cache=PrefixCache(64 << 20), checkpoint_tokens=8)
    yield s
    s.close()


def direct_logprobs(engine, tokens: list[int]) -> torch.Tensor:
    """log_softmax of every position's logits from a fresh read of `tokens`: row j predicts j + 1."""
    logits = engine.prefill(torch.tensor([tokens]), engine.new_state(), all_logits=True)[0]
    return torch.log_softmax(logits.float(), -1)


def test_reply_logprobs_are_those_of_a_direct_read(engine, sched):
    reply = sched.submit(Request(PROMPT, max_new_tokens=6, options=DecodeOptions(logprobs=3), cache=False))
    events = list(reply.tokens())
    ids = [ev.token_id for ev in events]
    lp = direct_logprobs(engine, PROMPT + ids)
    for i, ev in enumerate(events):
        row = lp[len(PROMPT) - 1 + i]
        assert abs(ev.logprob - float(row[ev.token_id])) < LOGPROB_ATOL
        values, top = torch.topk(row, 3)
        assert [t for t, _ in ev.top_logprobs] == top.tolist()
        assert all(abs(v - float(w)) < LOGPROB_ATOL for (_, v), w in zip(ev.top_logprobs, values))
        assert ev.token_id == top[0]  # greedy picks the likeliest


def test_prompt_logprobs_cover_every_position_and_recompute_a_cached_prefix(engine, sched):
    list(sched.submit(Request(PROMPT[:12], max_new_tokens=0)))  # a cached prefix the scorer must not skip
    reply = sched.submit(Request(PROMPT, max_new_tokens=0, prompt_logprobs=2))
    list(reply)
    assert reply.source == FRESH and reply.start == 0 and reply.finish_reason == "length"
    scores = reply.prompt_logprobs
    assert len(scores) == len(PROMPT) and scores[0] is None
    lp = direct_logprobs(engine, PROMPT)
    for j in range(1, len(PROMPT)):
        value, top = scores[j]
        assert abs(value - float(lp[j - 1, PROMPT[j]])) < LOGPROB_ATOL, j
        assert [t for t, _ in top] == torch.topk(lp[j - 1], 2).indices.tolist()
    again = sched.submit(Request(PROMPT, max_new_tokens=0))  # the scored read kept its states as usual
    list(again)
    assert again.source == HIT and again.start == len(PROMPT)


def test_n_replies_read_the_prompt_once_and_each_matches_its_solo_seed(engine, sched):
    sampling = SamplingParams(temperature=1.0, seed=7)
    reply = sched.submit(Request(PROMPT, sampling=sampling, max_new_tokens=8, n=4, cache=False))
    replies = [reply, *reply.siblings]
    got = [[ev.token_id for ev in r.tokens()] for r in replies]
    assert len(got) == 4 and all(len(g) == 8 for g in got)
    assert sched.stats()["prefill_tokens"] == len(PROMPT)  # one read for four replies
    assert len({tuple(g) for g in got}) > 1  # their own generators
    for i, tokens in enumerate(got):
        alone = sched.submit(Request(PROMPT, sampling=SamplingParams(temperature=1.0, seed=7 + i), max_new_tokens=8,
                                     cache=False))
        assert [ev.token_id for ev in alone.tokens()] == tokens, i
    assert all(r.finish_reason == "length" and r.end_state.seqlen == len(PROMPT) + 8 for r in replies)


def test_a_follower_closed_before_the_fork_ends_alone(engine):
    sched = Scheduler(engine, max_batch=4, prefill_budget=8, start=False)
    try:
        reply = sched.submit(Request(PROMPT, max_new_tokens=3, n=3, cache=False))
        assert sched.stats()["active_rows"] == 0 and sched.stats()["waiting"] == 1
        assert reply.siblings[0].close() == [] and reply.siblings[0].finish_reason == "cancelled"
        while not (reply.done.is_set() and reply.siblings[1].done.is_set()):
            sched.run_once()
        a, b = [ev.token_id for ev in reply.tokens()], [ev.token_id for ev in reply.siblings[1].tokens()]
        assert a == b and len(a) == 3  # greedy: the same reply twice
    finally:
        sched.close()


def test_n_counts_all_its_rows_at_admission(engine):
    sched = Scheduler(engine, max_batch=4, prefill_budget=8, max_waiting=0, start=False)
    try:
        with pytest.raises(ValueError, match="n must be from 1 to 4"):
            sched.submit(Request(PROMPT, max_new_tokens=2, n=5))
        sched.submit(Request(PROMPT, max_new_tokens=2, n=3, cache=False))
        with pytest.raises(Exception, match="busy"):
            sched.submit(Request(PROMPT, max_new_tokens=2, n=2, cache=False))
    finally:
        sched.close()


def test_logit_bias_and_min_tokens_steer_the_choice(engine, sched):
    plain = [ev.token_id for ev in sched.submit(Request(PROMPT, max_new_tokens=4, cache=False)).tokens()]
    forced = sched.submit(Request(PROMPT, max_new_tokens=4, cache=False, options=DecodeOptions(logit_bias=((300, 100.0),))))
    assert [ev.token_id for ev in forced.tokens()] == [300] * 4
    stop = plain[0]  # the token greedy picks first ends the reply at once, unless min_tokens holds it off
    short = sched.submit(Request(PROMPT, max_new_tokens=6, stop_token_ids=(stop,), cache=False))
    assert [ev.token_id for ev in short.tokens()] == [stop] and short.finish_reason == "stop"
    held = sched.submit(Request(PROMPT, max_new_tokens=6, stop_token_ids=(stop,), cache=False,
                                options=DecodeOptions(min_tokens=3)))
    ids = [ev.token_id for ev in held.tokens()]
    assert stop not in ids[:3] and len(ids) >= 3


def test_frequency_and_presence_penalties_follow_openais_formula():
    row = DecodeRow(SamplingParams(), 8, vocab_size=6, options=DecodeOptions(frequency_penalty=0.5, presence_penalty=1.5))
    logits = torch.tensor([[4.0, 3.9, 1.0, 0.0, -1.0, -2.0]])
    assert row.choose(logits) == 0
    row.emit(0, 0.0)
    assert row.choose(logits) == 1  # token 0 paid 0.5 + 1.5
    row.emit(1, 0.0)
    counts = torch.tensor([1.0, 1.0, 0, 0, 0, 0])
    assert torch.allclose(row.process(logits), logits - counts * 0.5 - (counts > 0).float() * 1.5)
    plain = DecodeRow(SamplingParams(), 8, vocab_size=6)
    assert plain.process(logits) is logits  # a row that asks for nothing pays nothing


class _Exploding:
    """A grammar whose matcher fails on its first mask: the row using it must fail alone."""

    def matcher(self):
        return self

    def allowed(self, out):
        raise RuntimeError("matcher broke")


def test_a_failing_grammar_ends_its_row_alone(engine, sched):
    bad = sched.submit(Request(PROMPT, max_new_tokens=4, cache=False, options=DecodeOptions(grammar=_Exploding())))
    good = sched.submit(Request(PROMPT[:9], max_new_tokens=4, cache=False))
    with pytest.raises(RequestFailed, match="matcher broke"):
        list(bad.tokens())
    assert len([ev for ev in good.tokens()]) == 4 and good.finish_reason == "length"


def test_logprobs_in_a_batch_equal_those_alone(engine, sched):
    opts = DecodeOptions(logprobs=2)
    alone = list(sched.submit(Request(PROMPT, max_new_tokens=6, options=opts, cache=False)).tokens())
    others = [sched.submit(Request(PROMPT[i:], sampling=SamplingParams(temperature=1.0, seed=i), max_new_tokens=12,
                                   cache=False)) for i in range(1, 6)]
    batched = list(sched.submit(Request(PROMPT, max_new_tokens=6, options=opts, cache=False)).tokens())
    for r in others:
        list(r.tokens())
    assert [e.token_id for e in batched] == [e.token_id for e in alone]
    assert max(e.metrics.batch_mean for e in batched) > 1  # it did share its steps
    for a, b in zip(alone, batched):
        assert abs(a.logprob - b.logprob) < 1e-5
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
