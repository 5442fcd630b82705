"""The prefix-state cache: every hit is exact, the budget holds, pins hold, namespaces isolate.

Exactness is checked against reading the same tokens from scratch with the engine (fp32): equal to
float rounding (states written by decode steps vs one prefill differ only in summation order).
"""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_fixtures import bundled_checkpoint

from fm_demo import chat
from fm_demo.conversations.sessions import Conversation
from fm_demo.engine import Engine, SamplingParams, tiny_model
from fm_demo.models import ModelManager
from fm_demo.serving import scheduler
from fm_demo.serving.completion import CompletionRequest, complete
from fm_demo.serving.prefix_cache import CachePool, PrefixCache
from fm_demo.settings import Preset, Settings

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model(seed=4, hidden_size=64, num_hidden_layers=2), chunk_size=16)


def read(engine, tokens: list[int]):
    state = engine.new_state()
    if tokens:
        engine.prefill(torch.tensor([tokens]), state)
    return state


def close(a, b) -> bool:
    return a.seqlen == b.seqlen and torch.allclose(a.ssm, b.ssm, atol=ATOL) and torch.allclose(a.conv, b.conv, atol=ATOL)


def test_longest_prefix_with_a_state_wins_at_any_token(engine):
    cache = PrefixCache(budget_bytes=10 ** 9)
    doc = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    for cut in (7, 120, 121, 300):
        cache.insert(doc[:cut], read(engine, doc[:cut]), "a")
    other = doc[:200] + [1, 2, 3]  # shares 200 tokens with the document, then goes its own way
    for tokens, want in ((doc, 300), (doc[:250], 121), (other, 121), (doc[:121], 121), (doc[:6], 0), ([], 0)):
        n, state, node = cache.lookup(tokens, "a", "cpu", engine.new_state)
        assert n == want and state.seqlen == want
        assert close(state, read(engine, tokens[:n]))
        if node is not None:
            assert state.ssm.data_ptr() != node.state.ssm.data_ptr()  # a private copy
    assert cache.stats()["states"] == 4 and cache.stats()["hits"] == 4


def test_hits_from_any_writer_are_exact(engine):
    """States written by prefill, by a batched decode and by another namespace's request all match
    a scratch read of their tokens."""
    cache = PrefixCache(budget_bytes=10 ** 9, shared=True)
    prompt = list(range(30, 60))
    state = read(engine, prompt)
    ids = [ev.token_id for ev in engine.stream(torch.tensor([[7]]), state, SamplingParams(), 12)]
    cache.insert(prompt + [7] + ids, state, "writer")
    n, got, _ = cache.lookup(prompt + [7] + ids + [99, 98], "reader", "cpu", engine.new_state)
    assert n == len(prompt) + 1 + len(ids) and close(got, read(engine, prompt + [7] + ids))


def test_budget_evicts_least_recent_leaves_and_never_pinned_ones(engine):
    one = engine.state_nbytes()
    cache = PrefixCache(budget_bytes=3 * one)
    base = list(range(10, 20))
    nodes = {}
    for i in range(3):
        nodes[i] = cache.insert(base + [i], read(engine, base + [i]), "a")
    with cache.pinned(nodes[0]):
        cache.find(base + [1], "a")  # 1 is now more recent than 2
        cache.insert(base + [3], read(engine, base + [3]), "a")  # over budget: 2 goes (0 is pinned)
        assert cache.nbytes <= 3 * one
        assert cache.find(base + [0], "a")[0] == 11 and cache.find(base + [1], "a")[0] == 11
        assert cache.find(base + [2], "a") == (0, None)
        # the look-ups above made 1 more recent than 3: inserting 4 evicts 3, never the pinned 0
        cache.insert(base + [4], read(engine, base + [4]), "a")
        assert cache.find(base + [3], "a") == (0, None)
        assert cache.find(base + [0], "a")[0] == 11 and cache.find(base + [1], "a")[0] == 11
    assert cache.stats()["evictions"] == 2 and cache.nbytes == 3 * one


def test_a_pool_holds_one_budget_over_every_member_and_evicts_across_them(engine):
    """Two models' caches in one pool: together they stay within one budget; the least recently
    used state goes whichever cache holds it; a detached cache leaves the budget to the others."""
    one = engine.state_nbytes()
    pool = CachePool(3 * one)
    a, b = pool.cache(), pool.cache()
    a.insert([1, 2], read(engine, [1, 2]), "s")
    a.insert([1, 3], read(engine, [1, 3]), "s")
    b.insert([5, 6], read(engine, [5, 6]), "s")
    a.find([1, 3], "s")  # [1, 2] in cache a is now the least recently used of all three
    b.insert([5, 7], read(engine, [5, 7]), "s")  # over the shared budget: a's [1, 2] goes
    assert pool.nbytes == 3 * one and a.nbytes + b.nbytes == 3 * one
    assert a.find([1, 2], "s") == (0, None) and a.find([1, 3], "s")[0] == 2
    assert b.find([5, 6], "s")[0] == 2 and b.find([5, 7], "s")[0] == 2
    assert a.stats()["budget_bytes"] == 3 * one and a.stats()["pool_bytes"] == 3 * one
    pool.detach(a)
    assert a.nbytes == 0 and pool.nbytes == 2 * one and pool.members == [b]
    b.insert([5, 8], read(engine, [5, 8]), "s")  # a's share is free: nothing of b's goes
    assert b.stats()["evictions"] == 0 and pool.nbytes == 3 * one


def test_a_pool_keeps_its_budget_under_concurrent_inserts_into_several_members(engine):
    one = engine.state_nbytes()
    pool = CachePool(5 * one)
    caches = [pool.cache() for _ in range(3)]
    states = {i: read(engine, [i % 7 + 1, i]) for i in range(60)}
    over = []

    def writer(k):
        for i in range(k, 60, 3):
            caches[k].insert([i % 7 + 1, i], states[i].clone(), "s")
            over.append(pool.nbytes > 5 * one)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(over) and pool.nbytes == 5 * one
    assert sum(c.stats()["states"] for c in caches) == 5


def test_a_namespace_whose_states_are_all_gone_leaves_no_trace(engine):
    cache = PrefixCache(budget_bytes=engine.state_nbytes())
    for i in range(5):  # each client its own namespace; the budget holds one state
        cache.insert([1, 2, i], read(engine, [1, 2, i]), f"api:user:{i}")
    assert cache.stats()["states"] == 1 and cache.stats()["namespaces"] == 1


def test_namespaces_isolate_unless_sharing_is_on(engine):
    tokens = list(range(40))
    for shared in (False, True):
        cache = PrefixCache(budget_bytes=10 ** 9, shared=shared)
        cache.insert(tokens, read(engine, tokens), "alice")
        n, _, _ = cache.lookup(tokens + [1], "bob", "cpu", engine.new_state)
        assert n == (40 if shared else 0)
        assert cache.lookup(tokens + [1], "alice", "cpu", engine.new_state)[0] == 40


# -- through the serving layer: a real checkpoint, the batched runner ----------------------------
@pytest.fixture(scope="module")
def lms():
    presets = {"instruct": Preset("instruct", "tiny instruct", bundled_checkpoint("instruct"), "instruct",
                                  ("fp32",), "fp32")}
    out = {}
    for shared in (False, True):
        manager = ModelManager(Settings(device="cpu", share_prefix_cache=shared), presets=presets)
        out[shared] = manager.get("instruct")
    yield out
    for lm in out.values():
        lm.runner.close()


def _ask(lm, messages, ns, max_new=24):
    fmt = chat.format_for("instruct")
    ids = chat.encode(lm.tokenizer, chat.render(fmt, messages, add_generation_prompt=True))
    stops = tuple(chat.stop_token_ids(fmt, lm.tokenizer, lm.model.generation_config.eos_token_id))
    chunks = list(complete(lm, CompletionRequest(ids, SamplingParams(), max_new, stops, namespace=ns)))
    return "".join(c.text for c in chunks), chunks[-1].usage, ids


def test_a_resent_history_resumes_from_the_cached_reply_and_replies_as_from_scratch(lms):
    lm = lms[False]
    msgs = [{"role": "user", "content": "What is 12 plus 7?"}]
    text1, u1, ids1 = _ask(lm, msgs, "api:one")
    assert u1.cached_tokens == 0 and u1.completion_tokens > 0
    msgs += [{"role": "assistant", "content": text1}, {"role": "user", "content": "And 3 plus 4?"}]
    text2, u2, ids2 = _ask(lm, msgs, "api:one")
    assert u2.cached_tokens >= u1.prompt_tokens  # the whole first turn, reply included where it re-tokenizes
    # the reply equals the reply from an empty cache (another namespace reads everything)
    text3, u3, _ = _ask(lm, msgs, "api:two")
    assert u3.cached_tokens == 0 and text3 == text2


def test_requests_sharing_a_system_prompt_resume_from_its_end(lms):
    lm = lms[False]
    fmt = chat.format_for("instruct")
    system = {"role": "system", "content": " ".join(f"Rule {i}: answer briefly." for i in range(40))}
    stops = tuple(chat.stop_token_ids(fmt, lm.tokenizer, lm.model.generation_config.eos_token_id))
    usages, texts = [], []
    for question in ("What is 2 plus 3?", "Spell the word cat backwards.", "What is 2 plus 3?"):
        ids, ends = chat.encode_messages(fmt, lm.tokenizer, [system, {"role": "user", "content": question}])
        req = CompletionRequest(ids, SamplingParams(), 12, stops, namespace="api:system", keep_at=ends)
        chunks = list(complete(lm, req))
        usages.append(chunks[-1].usage)
        texts.append("".join(c.text for c in chunks))
    assert usages[0].cached_tokens == 0 and usages[1].cached_tokens == ends[0]  # the system message's end
    assert usages[2].cached_tokens == usages[2].prompt_tokens - 1 and texts[2] == texts[0]
    fresh = list(complete(lm, CompletionRequest(chat.encode_messages(
        fmt, lm.tokenizer, [system, {"role": "user", "content": "Spell the word cat backwards."}])[0],
        SamplingParams(), 12, stops, namespace="api:fresh")))
    assert "".join(c.text for c in fresh) == texts[1]  # resumed at the boundary, the reply is the same


def test_the_repetition_penalty_sees_the_cached_part_of_the_prompt_too(lms):
    lm = lms[False]
    fmt = chat.format_for("instruct")
    ids = chat.encode(lm.tokenizer, chat.render(fmt, [{"role": "user", "content": "Spell the word river."}],
                                                add_generation_prompt=True))
    penalty = SamplingParams(repetition_penalty=1.5)
    texts, seen = [], []

    class Recording(scheduler.DecodeRow):
        def __init__(self, sampling, max_new, stops, tokenizer, context, *args, **kwargs):
            seen.append(list(context))
            super().__init__(sampling, max_new, stops, tokenizer, context, *args, **kwargs)

    real, scheduler.DecodeRow = scheduler.DecodeRow, Recording
    try:
        for ns in ("rp:a", "rp:a", "rp:b"):  # uncached, cached, uncached again
            chunks = list(complete(lm, CompletionRequest(ids, penalty, 16, namespace=ns)))
            texts.append(("".join(c.text for c in chunks), chunks[-1].usage.cached_tokens))
    finally:
        scheduler.DecodeRow = real
    assert texts[1][1] == len(ids) - 1 and texts[0][1] == texts[2][1] == 0
    assert seen == [ids] * 3  # the penalty's context is the whole prompt however much was cached
    assert texts[0][0] == texts[1][0] == texts[2][0]


def test_sharing_serves_a_document_once_for_everyone(lms):
    doc = " ".join(f"line {i}: the falcon flies over the desert." for i in range(60))
    for shared, lm in lms.items():
        _, first, _ = _ask(lm, [{"role": "user", "content": doc + " What flies?"}], "s:alice", 4)
        _, second, _ = _ask(lm, [{"role": "user", "content": doc + " What flies?"}], "s:bob", 4)
        assert first.cached_tokens == 0
        if shared:
            assert second.cached_tokens == second.prompt_tokens - 1
        else:
            assert second.cached_tokens == 0  # nothing visible across namespaces


def test_eviction_while_rows_run_keeps_every_reply_exact(lms):
    """A budget of a few states, many concurrent conversations: the tree evicts while rows run,
    every reply still equals its reply computed alone."""
    lm = lms[False]
    one = lm.engine.state_nbytes()
    lm.prefix_cache.budget_bytes, saved = 4 * one, lm.prefix_cache.budget_bytes
    try:
        questions = [f"What is {a} plus {a + 3}?" for a in range(10, 18)]
        solo = {}
        for q in questions:
            conv = Conversation(lm, Settings(device="cpu", max_new_tokens=20))
            for _ in range(2):
                list(conv.send(q))
            solo[q] = [t.reply_ids for t in conv.turns]
        results = {}

        def chat_twice(q):
            conv = Conversation(lm, Settings(device="cpu", max_new_tokens=20))
            for _ in range(2):
                list(conv.send(q))
            results[q] = [t.reply_ids for t in conv.turns]

        threads = [threading.Thread(target=chat_twice, args=(q,)) for q in questions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == solo
        assert lm.prefix_cache.nbytes <= 4 * one and lm.prefix_cache.stats()["evictions"] > 0
    finally:
        lm.prefix_cache.budget_bytes = saved


def test_a_conversation_whose_states_were_evicted_is_rebuilt_and_replies_as_before(lms):
    lm = lms[False]
    conv = Conversation(lm, Settings(device="cpu", max_new_tokens=20))
    list(conv.send("Remember the word amber."))
    twin = conv.fork()
    for node in list(conv.cache.refs.values()):  # the budget took every state of this session
        lm.prefix_cache.discard(node)
    a = list(conv.send("What word did I ask you to remember?"))[-1]
    b = list(twin.send("What word did I ask you to remember?"))[-1]
    assert not a.metrics.cache_hit and a.metrics.rebuilt_tokens > 0
    assert b.metrics.cache_hit  # same session, same tokens: the twin resumes from the rebuilt states
    assert conv.turns[-1].reply_ids == twin.turns[-1].reply_ids
