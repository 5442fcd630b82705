"""Branches of a conversation on a real tiny Falcon Mamba checkpoint: retry and edit keep the old
version, a switch back reads nothing, N replies come from one read, a rewind to token k equals a
fresh read of the same tokens, and branches travel through export, import and the history.
"""

from __future__ import annotations

import pytest
import torch
from test_sessions import GREEDY, N, check_last_reply, run, scratch_reply
from tiny_fixtures import bundled_checkpoint

from fm_demo.conversations.sessions import Conversation, ConversationError
from fm_demo.conversations.transfer import forks_json, transcript_json
from fm_demo.engine import SamplingParams
from fm_demo.models import ModelManager
from fm_demo.settings import Preset, Settings

pytestmark = pytest.mark.usefixtures("one_thread")
HOT = SamplingParams(temperature=2.5, seed=11)  # the tiny model is sure of itself: a hot sampler tells replies apart


@pytest.fixture(scope="module")
def settings():
    return Settings(device="cpu", max_new_tokens=N)


@pytest.fixture(scope="module")
def lm(settings):
    presets = {"instruct": Preset("instruct", "tiny instruct", bundled_checkpoint("instruct"), "instruct",
                                  ("fp32",), "fp32")}
    return ModelManager(settings, presets=presets).get("instruct")


def versions(conv: Conversation, turn: int) -> list[list[int]]:
    """The reply ids of every version of `turn`, in order (switching through them)."""
    out = []
    for k in range(conv.branch_points()[turn][1]):
        conv.switch(turn, k)
        out.append(list(conv.turns[turn].reply_ids))
    return out


def test_retry_keeps_versions_and_a_switch_back_reads_nothing(lm, settings):
    conv = Conversation(lm, settings)
    run(conv.send("What is 47 + 35?"))
    first = list(conv.turns[0].reply_ids)
    run(conv.retry(HOT))
    second = list(conv.turns[0].reply_ids)
    run(conv.retry(SamplingParams(temperature=2.5, seed=12)))
    assert conv.branch_points() == {0: (3, 3)}
    m = conv.switch(0, 0)
    assert conv.turns[0].reply_ids == first and conv.branch_points() == {0: (1, 3)}
    assert m.prefilled_tokens == 0 and m.cache_hit and m.new_tokens == 0
    assert m.finish_reason == "version 1 of 3 shown"
    conv.switch(0, 1)
    assert conv.turns[0].reply_ids == second
    conv.switch(0, 0)
    # continues with the same greedy reply as a conversation that never left the first version
    last = run(conv.send("Remember the word falcon."))
    plain = Conversation(lm, settings)
    run(plain.send("What is 47 + 35?"))
    run(plain.send("Remember the word falcon."))
    assert conv.token_ids() == plain.token_ids()
    assert last.metrics.prefilled_tokens == len(conv.turns[1].prompt_ids)  # only the new turn was read
    check_last_reply(conv)


def test_edit_keeps_the_old_message_and_what_followed(lm, settings):
    conv = Conversation(lm, settings)
    run(conv.send("What is 47 + 35?"))
    run(conv.send("Is 17 greater than 9?"))
    before = conv.token_ids()
    run(conv.edit(0, "what's 80 minus 29"))
    assert len(conv.turns) == 1 and conv.branch_points() == {0: (2, 2)}
    m = conv.switch(0, 0)
    assert conv.token_ids() == before and len(conv.turns) == 2 and m.prefilled_tokens == 0
    run(conv.send("Which word did I ask you to remember?"))
    check_last_reply(conv)
    conv.switch(0, 1)
    assert [t.user for t in conv.turns] == ["what's 80 minus 29"]
    conv.undo()  # the turn and its versions go
    assert conv.branch_points() == {} and conv.forks == {}


def test_a_switch_to_an_evicted_version_reads_it_again_and_says_so(lm, settings):
    conv = Conversation(lm, settings)
    run(conv.send("Spell the word cat backwards."))
    run(conv.send("What can you do?"))
    run(conv.retry(HOT))
    conv.trim(2)  # every version lets go of its states, and the cache drops those no one holds
    m = conv.switch(1, 0)
    assert not m.cache_hit and m.prefilled_tokens == conv.context_tokens and m.rebuilt_tokens > 0
    run(conv.send("What is 47 + 35?"))
    check_last_reply(conv)


def test_n_replies_come_from_one_read_and_picking_one_continues_from_it(lm, settings):
    conv = Conversation(lm, settings)
    run(conv.send("hi! what is the capital of japan"))
    sched = lm.runner
    read_before = sched.stats()["prefill_tokens"]
    last = run(conv.send_many("Write a poem about the sea.", 3, HOT))
    prompt = len(conv.turns[1].prompt_ids)
    assert len(last.texts) == 3 and last.metrics.replies == 3 and last.metrics.prefilled_tokens == prompt
    assert sched.stats()["prefill_tokens"] - read_before == prompt  # one read of the prompt for all 3
    assert conv.branch_points() == {1: (1, 3)}
    replies = versions(conv, 1)
    assert [conv.lm.tokenizer.decode(r, skip_special_tokens=True) for r in replies] == last.texts
    assert len({tuple(r) for r in replies}) > 1, "a hot sampler should give different replies"
    m = conv.switch(1, 1)  # pick the second
    assert m.prefilled_tokens == 0 and conv.turns[1].reply_ids == replies[1]
    follow = run(conv.send("What can you do?"))
    assert follow.metrics.prefilled_tokens == len(conv.turns[2].prompt_ids)
    check_last_reply(conv)


def test_rewind_to_token_k_equals_a_fresh_read_of_the_same_tokens(lm, settings):
    conv = Conversation(lm, settings)
    run(conv.send("Write a poem about the sea."))
    turn = conv.turns[0]
    assert len(turn.logprobs) == len(turn.reply_ids) and all(len(top) == 5 for _, top in turn.logprobs)
    k = 3
    alt = next(t for t, _ in turn.logprobs[k][1] if t != turn.reply_ids[k])
    prompt_end = conv.context_tokens - len(turn.reply_ids)
    ids = conv.token_ids()[:prompt_end] + turn.reply_ids[:k] + [alt]
    last = run(conv.rewind(0, k, alt))
    new = conv.turns[0]
    assert new.reply_ids[:k + 1] == turn.reply_ids[:k] + [alt]
    assert last.metrics.prefilled_tokens == k + 2  # the last prompt token, k reply tokens, the chosen one
    assert new.reply_ids[k + 1:] == scratch_reply(lm, ids, max_new=N)
    # the state after the rewound reply is the state of a fresh read of the same tokens
    state = conv.cache.at(conv.context_tokens)
    fresh = lm.engine.new_state()
    lm.engine.prefill(torch.tensor([conv.token_ids()]), fresh)
    torch.testing.assert_close(state.ssm, fresh.ssm, rtol=1e-4, atol=1e-5)
    assert conv.branch_points() == {0: (2, 2)}
    conv.switch(0, 0)
    assert conv.turns[0].reply_ids == turn.reply_ids


def test_branch_into_a_new_chat_reads_only_its_own_tokens(lm, settings):
    conv = Conversation(lm, settings)
    run(conv.send("Remember the word falcon."))
    run(conv.send("What is 47 + 35?"))
    new = conv.fork(0)
    assert len(new.turns) == 1 and new.token_ids() == conv.token_ids()[:new.context_tokens]
    last = run(new.send("Which word did I ask you to remember?"))
    assert last.metrics.prefilled_tokens == len(new.turns[1].prompt_ids) and last.metrics.cache_hit
    check_last_reply(new)
    assert len(conv.turns) == 2  # the original is untouched


def test_branches_travel_through_export_import_and_the_history(lm, settings):
    conv = Conversation(lm, settings)
    run(conv.send("What is 47 + 35?"))
    run(conv.retry(HOT))
    run(conv.send("Is 17 greater than 9?"))
    run(conv.edit(1, "what's 80 minus 29"))
    shown = conv.token_ids()
    want = {0: versions(conv, 0)}
    conv.switch(0, 1)
    want[1] = versions(conv, 1)
    conv.switch(1, 1)
    assert conv.token_ids() == shown
    for other in (Conversation.import_bytes(conv.export(), lm, settings),
                  Conversation.restore(lm, transcript_json(conv.system, conv.turns, forks_json(conv.forks)),
                                       None, settings)):
        assert other.token_ids() == shown and other.branch_points() == conv.branch_points()
        assert versions(other, 1) == want[1]
        assert versions(other, 0) == want[0]


def test_bad_branch_requests_are_refused(lm, settings):
    conv = Conversation(lm, settings)
    with pytest.raises(ConversationError, match="no other versions"):
        conv.switch(0, 0)
    run(conv.send("What is 47 + 35?"))
    run(conv.retry(HOT))
    with pytest.raises(ConversationError, match="has 2 versions"):
        conv.switch(0, 5)
    with pytest.raises(ConversationError, match="greedy"):
        conv.send_many("hi", 3, GREEDY)
    with pytest.raises(ConversationError, match="from 2 to 4"):
        conv.send_many("hi", 9, HOT)
    with pytest.raises(ConversationError, match="no token"):
        conv.rewind(0, 10_000, 5)
    with pytest.raises(ConversationError, match="not a token"):
        conv.rewind(0, 0, 10**9)
    with pytest.raises(ConversationError, match="ends the reply"):
        conv.rewind(0, 0, conv.stop_ids()[0])
    with pytest.raises(ConversationError, match="no turn"):
        conv.fork(7)
    assert conv.branch_points() == {0: (2, 2)}  # nothing changed


def test_the_token_view_probabilities_are_the_apis_logprobs(lm, settings):
    """One implementation: a chat reply's recorded probabilities equal what the OpenAI-compatible
    API's logprobs return for the same prompt (engine/decode.py computes both)."""
    from fm_demo.engine import DecodeOptions
    from fm_demo.serving.completion import CompletionRequest, complete

    conv = Conversation(lm, settings)
    run(conv.send("Which word did I ask you to remember?"))
    turn = conv.turns[0]
    prompt = conv.token_ids()[:conv.context_tokens - len(turn.reply_ids)]
    chunks = list(complete(lm, CompletionRequest(prompt, GREEDY, N, conv.stop_ids(), namespace="api-check",
                                                 options=DecodeOptions(logprobs=5))))
    api = [entry for c in chunks for entry in c.logprobs]
    assert [t for t, _, _ in api] == turn.reply_ids
    for (_, lp, top), (mine, my_top) in zip(api, turn.logprobs):
        assert lp == pytest.approx(mine, abs=1e-5)
        assert [t for t, _ in top] == [t for t, _ in my_top]
        assert [v for _, v in top] == pytest.approx([v for _, v in my_top], abs=1e-5)


def test_a_version_that_fails_before_its_first_token_leaves_the_one_shown_before(lm, settings, monkeypatch):
    from fm_demo.serving import SchedulerBusy

    conv = Conversation(lm, settings)
    run(conv.send("What is 47 + 35?"))
    run(conv.retry(HOT))
    run(conv.retry(SamplingParams(temperature=2.5, seed=12)))
    conv.switch(0, 0)
    shown = conv.token_ids()

    def busy(request):
        raise SchedulerBusy("The server is busy")

    alt = next(t for t, _ in conv.turns[0].logprobs[1][1] if t != conv.turns[0].reply_ids[1]
               and t not in conv.stop_ids())
    monkeypatch.setattr(lm.runner, "submit", busy)
    for attempt in (lambda: conv.retry(HOT), lambda: conv.edit(0, "Is 17 greater than 9?"),
                    lambda: conv.rewind(0, 1, alt)):
        with pytest.raises(SchedulerBusy):
            run(attempt())
        assert conv.token_ids() == shown and conv.branch_points() == {0: (1, 3)}
    monkeypatch.undo()
    run(conv.send("Remember the word falcon."))
    check_last_reply(conv)


def test_versions_follow_the_conversation_to_another_precision(lm, settings):
    from fm_demo.models import ModelManager

    manager = ModelManager(settings, presets={"instruct": Preset("instruct", "tiny instruct",
                                                                 bundled_checkpoint("instruct"), "instruct",
                                                                 ("fp32", "bf16"), "fp32")})
    fp32, bf16 = manager.get("instruct", "fp32"), manager.get("instruct", "bf16")
    conv = Conversation(fp32, settings)
    run(conv.send("What is 47 + 35?"))
    run(conv.retry(HOT))
    conv.bind(bf16)  # the fp32 states are not this model's: every version lets go of them
    m = conv.switch(0, 0)
    assert not m.cache_hit and m.prefilled_tokens == conv.context_tokens
    state = conv.cache.at(conv.context_tokens)
    assert state.ssm.dtype == bf16.engine.new_state().ssm.dtype
    run(conv.send("Is 17 greater than 9?"))
