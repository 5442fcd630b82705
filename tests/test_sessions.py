"""Conversation and SessionStore on a real tiny Falcon Mamba checkpoint.

The central claim: a reply computed from the cached recurrent state (only the new turn's tokens
read) is token for token the reply computed by re-reading the whole transcript from a fresh
state; after retry, undo, edit, a stopped reply, eviction, export/import.
"""

from __future__ import annotations

import inspect
import multiprocessing

import pytest
import torch
from tiny_fixtures import bundled_checkpoint

from fm_demo import chat
from fm_demo.conversations.sessions import Conversation, ConversationBusy, ConversationError, ImportRefused
from fm_demo.conversations.store import SessionStore
from fm_demo.engine import SamplingParams
from fm_demo.models import ModelManager
from fm_demo.settings import Preset, Settings

GREEDY = SamplingParams()
N = 16  # new tokens per reply: enough to see divergence, short enough for a fast suite



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def settings():
    return Settings(device="cpu", max_new_tokens=N)


@pytest.fixture(scope="module")
def manager(settings, tmp_path_factory):
    presets = {kind: Preset(kind, f"tiny {kind}", bundled_checkpoint(kind), kind,
                            ("fp32", "bf16"), "fp32") for kind in ("instruct", "base")}
    return ModelManager(settings, presets=presets)


@pytest.fixture(scope="module")
def lm(manager):
    return manager.get("instruct")


def scratch_reply(lm, ids: list[int], sampling=GREEDY, max_new=N) -> list[int]:
    """The reply after reading `ids` from a fresh state in one go (no cache)."""
    stops = chat.stop_token_ids(chat.format_for(lm.kind), lm.tokenizer, lm.model.generation_config.eos_token_id)
    stream = lm.engine.stream(torch.tensor([ids]), lm.engine.new_state(), sampling, max_new, stops, lm.tokenizer)
    return [ev.token_id for ev in stream]


def check_last_reply(conv: Conversation, sampling=GREEDY) -> None:
    ids, last = conv.token_ids(), conv.turns[-1]
    prompt_end = len(ids) - len(last.reply_ids)
    assert last.reply_ids == scratch_reply(conv.lm, ids[:prompt_end], sampling)
    if all(chat.encode(conv.lm.tokenizer, conv.lm.tokenizer.decode(t.reply_ids)) == t.reply_ids
           for t in conv.turns[:-1]):  # replies that re-tokenize to themselves: text == tokens
        system = [{"role": "system", "content": conv.system}] if conv.system else []
        text = chat.render(conv.fmt, system + conv.messages[:-1], add_generation_prompt=True)
        assert chat.encode(conv.lm.tokenizer, text) == ids[:prompt_end]


def run(events) -> object:
    *_, last = list(events)
    assert last.done
    return last


def test_five_turns_with_retry_undo_edit_equal_full_reencoding(lm, settings):
    conv = Conversation(lm, settings, system_prompt="You are a helpful falcon.")
    first = run(conv.send("Hello! Who are you?"))
    check_last_reply(conv)
    assert first.metrics.reused_tokens == 0 and first.metrics.cache_hit
    run(conv.send("What is 3 plus 4?"))
    check_last_reply(conv)
    hist = len(conv.token_ids()) - len(conv.turns[-1].reply_ids) - len(conv.turns[-1].prompt_ids)
    assert conv.last_metrics.reused_tokens == hist  # only the new turn was read
    assert conv.last_metrics.prefilled_tokens == len(conv.turns[-1].prompt_ids)

    hot = SamplingParams(temperature=1.0, seed=11)
    run(conv.retry(hot))
    check_last_reply(conv, hot)
    assert conv.last_metrics.prefilled_tokens == 1  # retry reads one token, from the snapshot
    run(conv.send("Name a capital city."))
    check_last_reply(conv)
    assert conv.undo() == "Name a capital city."
    assert len(conv.turns) == 2 and conv.messages[-1]["role"] == "assistant"
    run(conv.send("Spell the word cat."))
    check_last_reply(conv)
    assert conv.last_metrics.cache_hit and conv.last_metrics.rebuilt_tokens == 0

    run(conv.edit(1, "What is 5 plus 2?"))
    check_last_reply(conv)
    assert len(conv.turns) == 2 and conv.turns[1].user == "What is 5 plus 2?"
    assert conv.last_metrics.prefilled_tokens == len(conv.turns[1].prompt_ids)
    run(conv.send("Thanks, bye!"))
    check_last_reply(conv)
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 3


def test_stop_mid_reply_keeps_state_consistent(lm, settings):
    conv = Conversation(lm, settings)
    gen = conv.send("Tell me a long story about a falcon.", max_new_tokens=N)
    got = [next(gen) for _ in range(5)]
    gen.close()
    turn = conv.turns[-1]
    assert len(turn.reply_ids) == 5 and turn.finish_reason == "cancelled"
    assert conv.messages[-1] == {"role": "assistant", "content": got[-1].text}
    assert all(p <= conv.context_tokens for p in conv.cache.refs)  # no state beyond what was shown
    run(conv.send("Go on."))
    check_last_reply(conv)
    closing = chat.encode(lm.tokenizer, chat.INSTRUCT.turn_end + chat.INSTRUCT.turn_sep)
    assert conv.turns[-1].prompt_ids[:len(closing)] == closing  # the cut reply was closed for the model


def test_eviction_rebuilds_identical_reply_and_reports_miss(lm, settings):
    conv = Conversation(lm, settings)
    run(conv.send("Hello!"))
    run(conv.send("What is 2 plus 2?"))
    history = conv.context_tokens
    tree_bytes = lm.prefix_cache.nbytes
    assert conv.trim(2) > 0 and conv.cache_bytes() == 0
    assert lm.prefix_cache.nbytes < tree_bytes  # nobody else held them: freed in the model's prefix cache
    assert lm.prefix_cache.find(conv.token_ids(), conv.namespace) == (0, None)
    a = run(conv.send("And 3 plus 3?"))
    check_last_reply(conv)
    assert not a.metrics.cache_hit and a.metrics.reused_tokens == 0 and a.metrics.rebuilt_tokens == history
    first = list(conv.turns[-1].reply_ids)
    # the rebuild restored the turn snapshots: undo + send is a cache hit again
    conv.undo()
    run(conv.send("And 3 plus 3?"))
    assert conv.last_metrics.cache_hit and conv.turns[-1].reply_ids == first


def test_a_fork_keeps_shared_snapshots_alive(lm, settings):
    conv = Conversation(lm, settings)
    run(conv.send("Hello!"))
    twin = conv.fork()
    assert conv.trim(2) > 0 and conv.cache_bytes() == 0
    b = run(twin.send("What is 2 plus 2?"))
    assert b.metrics.cache_hit and b.metrics.rebuilt_tokens == 0  # the twin still holds its snapshots


def test_store_budget_evicts_least_recent_and_rebuilds(manager, settings):
    one_state = manager.get("instruct").engine.state_nbytes()
    store = SessionStore(settings.replace(session_budget_bytes=6 * one_state), manager)
    a = store.conversation("A", "instruct")
    ref = Conversation(manager.get("instruct"), settings)  # the same chat, outside the store
    for q in ("Hi!", "What is 1 plus 1?", "And 2 plus 2?"):
        run(a.send(q)), run(ref.send(q))
    b = store.conversation("B", "instruct")
    for q in ("Hello!", "What is 4 plus 4?", "And 5 plus 5?", "Bye."):
        run(b.send(q))
    stats = store.stats()
    assert stats["cache_bytes"] <= 6 * one_state and stats["trims"] + stats["evictions"] > 0
    a = store.conversation("A", "instruct")
    run(a.send("And 3 plus 3?"))
    run(ref.send("And 3 plus 3?"))
    assert a.turns[-1].reply_ids == ref.turns[-1].reply_ids
    assert not a.last_metrics.cache_hit and store.stats()["cache_misses"] >= 1


def test_sessions_are_isolated(manager, settings):
    store = SessionStore(settings, manager)
    a, b = store.conversation("a", "instruct"), store.conversation("b", "instruct")
    assert a is not b and store.conversation("a", "instruct") is a
    run(a.send("My secret word is falcon."))
    assert b.messages == [] and b.context_tokens == 0
    run(b.send("What is my secret word?"))
    check_last_reply(b)
    assert b.last_metrics.reused_tokens == 0
    left = store.conversation("a", "instruct", slot="left")
    assert left is not a and left.messages == []
    store.reset("a")
    assert store.get("a") is None and store.get("b") is b


def test_export_import_resumes_identically(lm, settings):
    conv = Conversation(lm, settings, system_prompt="Be brief.")
    run(conv.send("Hello!"))
    gen = conv.send("Count to ten.")
    next(gen), next(gen)
    gen.close()
    data = conv.export()
    back = Conversation.import_bytes(data, lm, settings)
    assert back.messages == conv.messages and back.system == "Be brief."
    assert back.token_ids() == conv.token_ids()
    run(conv.send("Again please.")), run(back.send("Again please."))
    assert back.turns[-1].reply_ids == conv.turns[-1].reply_ids
    assert back.last_metrics.cache_hit and back.last_metrics.prefilled_tokens == len(back.turns[-1].prompt_ids)


def _tamper_payload(data: bytes, edit) -> bytes:
    """Rewrite the transcript and recompute the checksum, as a careful forger would."""
    import json

    from safetensors.torch import load, save

    from fm_demo.conversations.transfer import _digest

    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n])["__metadata__"]
    payload = json.loads(meta["fm_demo"])
    edit(payload)
    body = json.dumps(payload, sort_keys=True)
    tensors = load(data)
    return save(tensors, metadata={"fm_demo": body, "sha256": _digest(body, tensors)})


def test_bad_imports_are_refused(manager, lm, settings):
    conv = Conversation(lm, settings)
    run(conv.send("Hello!"))
    data = conv.export()
    base = manager.get("base")
    cases = {
        "not a conversation file": b"garbage" * 10,
        "not a conversation file ": data[:20],
        "checksum": data[:-3] + bytes([data[-3] ^ 1]) + data[-2:],
        "version": _tamper_payload(data, lambda p: p.update(version=99)),
        "prompt format": _tamper_payload(data, lambda p: p["turns"][0].update(user="Hi!")),
        "malformed": _tamper_payload(data, lambda p: p["turns"][0].update(reply_ids=[10 ** 9])),
        "tokens": _tamper_payload(data, lambda p: p["state"].update(seqlen="5")),
        "not valid Unicode": _tamper_payload(data, lambda p: p["turns"][0].update(user="Hi \ud800")),
    }
    for why, blob in cases.items():
        with pytest.raises(ImportRefused, match=why.strip()):
            Conversation.import_bytes(blob, lm, settings)
    with pytest.raises(ImportRefused, match="another model"):
        Conversation.import_bytes(data, base, settings)
    small = settings.replace(max_import_bytes=len(data) - 1)
    with pytest.raises(ImportRefused, match="accepts up to"):
        Conversation.import_bytes(data, lm, small)


def test_a_header_beyond_the_cap_is_refused_unparsed(lm, settings):
    """A header of `[{},{},...]` grows ~25x when parsed; one longer than any transcript within the
    caps needs is refused from its 8-byte length, so the import allocates next to nothing."""
    import tracemalloc

    from fm_demo.conversations.transfer import header_limit

    small = settings.replace(max_upload_chars=4000)
    body = b"[" + b"{}," * (header_limit(small) // 3) + b"{}]"
    data = len(body).to_bytes(8, "little") + body
    tracemalloc.start()
    try:
        with pytest.raises(ImportRefused, match="header has .* at most"):
            Conversation.import_bytes(data, lm, small)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(data) // 4, peak  # parsed, the dicts alone would take ~20x the file


def test_a_transcript_beyond_the_typed_limits_is_refused(lm, settings):
    """An imported transcript is held to the limits typed input has: a message or system prompt
    longer than the chat box takes, and more characters or tokens than the longest prompt."""
    conv = Conversation(lm, settings, system_prompt="Be brief.")
    run(conv.send("Tell me about falcons. " * 8))
    run(conv.send("And owls?"))
    data = conv.export()
    longest, tokens = len("Tell me about falcons. " * 8), conv.context_tokens
    assert Conversation.import_bytes(data, lm, settings).token_ids() == conv.token_ids()  # within the caps
    cases = {
        "has 184 characters; the limit is 100": settings.replace(max_input_chars=100),
        f"{tokens:,} tokens; this server imports up to {tokens - 1:,}": settings.replace(max_upload_chars=tokens - 1),
    }
    for why, limits in cases.items():
        with pytest.raises(ImportRefused, match=why):
            Conversation.import_bytes(data, lm, limits)
    assert longest == 184
    brief = Conversation(lm, settings, system_prompt="Answer in one word.")
    run(brief.send("Hi"))
    with pytest.raises(ImportRefused, match="has 19 characters; the limit is 10"):
        Conversation.import_bytes(brief.export(), lm, settings.replace(max_input_chars=10))


def test_wrong_state_shape_is_refused(lm, settings):
    from safetensors.torch import load

    conv = Conversation(lm, settings)
    run(conv.send("Hello!"))
    data = conv.export()
    tensors = load(data)

    def shrink(p):
        p.update(turns=p["turns"])

    blob = _tamper_payload(data, shrink)
    import json

    from safetensors.torch import save

    from fm_demo.conversations.transfer import _digest

    n = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8:8 + n])["__metadata__"]
    bad = {"conv": tensors["conv"][:, :, :8].contiguous(), "ssm": tensors["ssm"][:, :, :8].contiguous()}
    forged = save(bad, metadata={"fm_demo": meta["fm_demo"], "sha256": _digest(meta["fm_demo"], bad)})
    with pytest.raises(ImportRefused, match="shape"):
        Conversation.import_bytes(forged, lm, settings)


@pytest.fixture(scope="module")
def sharing(settings):
    """(settings, manager) of a server that shares the prefix cache across sessions."""
    shared = settings.replace(share_prefix_cache=True)
    preset = Preset("instruct", "tiny instruct", bundled_checkpoint("instruct"), "instruct", ("fp32",), "fp32")
    return shared, ModelManager(shared, presets={"instruct": preset})


def _forge_state(data: bytes) -> bytes:
    """The same transcript with another state, checksum recomputed: what anyone can write."""
    import json

    from safetensors.torch import load, save

    from fm_demo.conversations.transfer import _digest

    n = int.from_bytes(data[:8], "little")
    body = json.loads(data[8:8 + n])["__metadata__"]["fm_demo"]
    tensors = load(data)
    tensors["ssm"] = torch.randn(tensors["ssm"].shape, generator=torch.Generator().manual_seed(0)) * 10
    return save(tensors, metadata={"fm_demo": body, "sha256": _digest(body, tensors)})


def test_an_imported_state_serves_only_its_conversation_with_sharing_on(lm, settings, sharing):
    """A forged state imported on a server that shares its prefix cache: the importer resumes from
    it, nobody else ever finds it or anything read on from it, and another session sending the
    same words gets the replies of a fresh read."""
    shared, smanager = sharing
    slm = smanager.get("instruct")
    src = Conversation(lm, settings, system_prompt="Be brief.")  # another model object: another tree
    run(src.send("Hello!"))
    imp = Conversation.import_bytes(_forge_state(src.export()), slm, shared)
    tokens = imp.token_ids()
    assert slm.prefix_cache.find(tokens, "browser:someone") == (0, None)
    run(imp.send("Again please."))
    assert imp.last_metrics.cache_hit and imp.last_metrics.reused_tokens == len(tokens)
    assert slm.prefix_cache.find(imp.token_ids(), "browser:someone") == (0, None)
    other = Conversation(slm, shared, system_prompt="Be brief.", namespace="browser:someone")
    run(other.send("Hello!"))
    assert other.token_ids() == tokens
    run(other.send("Again please."))
    check_last_reply(other)


def test_imported_states_leave_with_their_conversation(manager, settings, sharing):
    """An import that replaces a conversation frees the states of the one it replaced, so the
    store's budget counts every state an import holds; with sharing on too, and there a dropped
    import's state leaves the shared tree at once."""
    conv = Conversation(manager.get("instruct"), settings)
    run(conv.send("Hello!"))
    data = conv.export()
    conv.release_states()
    for s, m in ((settings, manager), sharing):
        store, tree = SessionStore(s, m), m.get("instruct").prefix_cache
        before = tree.nbytes
        first = store.import_bytes("a", data)
        second = store.import_bytes("a", data)
        assert store.get("a") is second and first.cache.snapshots == {}
        assert tree.nbytes - before == store.stats()["cache_bytes"] == second.cache_bytes() > 0
        store.reset("a")
        assert tree.nbytes == before


def test_busy_and_input_errors(lm, settings):
    conv = Conversation(lm, settings)
    gen = conv.send("Hello!")
    next(gen)
    with pytest.raises(ConversationBusy):
        next(conv.send("Another"))
    with pytest.raises(ConversationBusy):
        conv.undo()
    gen.close()
    with pytest.raises(ConversationError, match="empty"):
        conv.send("   ")
    with pytest.raises(ConversationError, match="limit"):
        conv.send("x" * (settings.max_input_chars + 1))
    with pytest.raises(ConversationError, match="no user message 5"):
        conv.edit(5, "hi")
    assert conv.undo() == "Hello!" and conv.undo() is None
    with pytest.raises(ConversationError, match="nothing to retry"):
        conv.retry()


def test_text_that_is_not_unicode_is_refused(lm, settings):
    """A lone surrogate (a JSON body's \\ud800) is refused with a message, not failed on in the
    tokenizer; the conversation stays as it was."""
    conv = Conversation(lm, settings)
    with pytest.raises(ConversationError, match="message is not valid Unicode .* at character 4"):
        conv.send("hi \ud800 there")
    with pytest.raises(ConversationError, match="system prompt is not valid Unicode"):
        conv.set_system_prompt("Be \udc00 brief.")
    assert conv.turns == [] and conv.system == settings.system_prompt
    run(conv.send("hi \U0001F600 there"))  # a character beyond the BMP is fine
    assert conv.turns[0].reply_ids


def test_system_prompt_change_rereads_and_matches(lm, settings):
    conv = Conversation(lm, settings)
    run(conv.send("Hello!"))
    conv.set_system_prompt("Answer in one word.")
    run(conv.send("Who are you?"))
    check_last_reply(conv)
    assert not conv.last_metrics.cache_hit
    assert conv.token_ids()[:3] == chat.encode(lm.tokenizer, "<|im_start|>system\nAnswer")[:3]


def test_base_model_transcript_and_stop_string(manager, settings):
    base = manager.get("base")
    conv = Conversation(base, settings)
    run(conv.send("Hello there."))
    check_last_reply(conv)
    run(conv.send("Tell me about falcons."))
    assert conv.fmt is chat.BASE
    if conv.turns[-1].finish_reason != "stop_string":
        check_last_reply(conv)
    assert "\nUser:" not in conv.turns[-1].reply
    assert conv.cache.snapshots.get(conv.context_tokens) is not None


def test_switching_model_keeps_the_conversation(manager, settings):
    store = SessionStore(settings, manager)
    conv = store.conversation("s", "instruct")
    run(conv.send("Hello!"))
    same = store.conversation("s", "base")
    assert same is conv and conv.fmt is chat.BASE and conv.messages[0]["content"] == "Hello!"
    run(conv.send("And now?"))
    assert not conv.last_metrics.cache_hit  # the new model read the transcript once
    check_last_reply(conv)


def test_ttl_and_session_limit(manager, settings):
    import time

    store = SessionStore(settings.replace(session_ttl_s=60, max_sessions=2), manager)
    a = store.conversation("a", "instruct")
    store.conversation("b", "instruct")
    store.conversation("c", "instruct")  # a third session: the least recent one goes
    assert store.get("a") is None and store.get("b") is not None and store.stats()["dropped_sessions"] == 1
    store.maintain(now=time.monotonic() + 120)
    assert store.stats()["conversations"] == 0 and store.stats()["expired"] == 2
    assert a.messages == []


def test_long_document_is_read_in_chunks_with_progress(lm, settings):
    conv = Conversation(lm, settings)
    seen = []
    doc = "The falcon flies over the desert. " * 120
    with pytest.raises(ConversationError, match="limit"):
        conv.send(doc * 20)
    run(conv.send(doc, progress=lambda done, total: seen.append((done, total)), allow_long=True))
    check_last_reply(conv)
    assert seen and seen[-1][0] == seen[-1][1] == len(conv.turns[-1].prompt_ids)


# -- ZeroGPU: replies through GPU calls whose arguments and results cross a process boundary ----
def _gpu_worker(conn, fn, args, kwargs) -> None:
    """The GPU worker's side: run fn, send each item (pickled), go on only when asked."""
    torch.set_num_threads(1)  # OpenMP's pool from the parent does not survive fork
    try:
        result = fn(*args, **kwargs)
        for item in result if inspect.isgenerator(result) else [result]:
            conn.send(("item", item))
            if conn.recv() == "stop":  # the visitor pressed stop: the worker is closed
                return
        conn.send(("end", None))
        conn.recv()  # stay until the caller has received the tensors
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _forked_items(fn, args, kwargs):
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_gpu_worker, args=(child, fn, args, kwargs), daemon=True)
    proc.start()
    try:
        while True:
            kind, item = parent.recv()
            if kind == "error":
                raise RuntimeError(item)
            parent.send("next")
            if kind == "end":
                return
            yield item
    finally:
        parent.send("stop")
        proc.join(30)


def forked_gpu_task(fn=None, *, duration=60):
    """What `spaces.GPU` does: each call runs in a forked process; what comes back is pickled."""
    if fn is None:
        return lambda f: forked_gpu_task(f, duration=duration)
    if inspect.isgeneratorfunction(fn):
        return lambda *args, **kwargs: _forked_items(fn, args, kwargs)

    def call(*args, **kwargs):
        items = _forked_items(fn, args, kwargs)
        try:
            return next(items)
        finally:
            items.close()

    return call


@pytest.fixture(params=["in_process", "forked"])
def zero_lm(request, manager, settings, monkeypatch):
    """The instruct model loaded as on ZeroGPU, its GPU calls in-process or in a forked worker."""
    from fm_demo import zerogpu

    monkeypatch.setattr(zerogpu, "on_zerogpu", lambda env=None: True)
    task = forked_gpu_task if request.param == "forked" else (lambda fn=None, *, duration=60: fn)
    monkeypatch.setattr(zerogpu, "gpu_task", task)
    zero = ModelManager(settings, presets=manager.presets)
    assert zero.gpu is not None
    return zero.get("instruct")


def same_state(a, b) -> bool:
    # The two paths cut the same tokens into different prefill chunks: equal up to float rounding.
    return a.seqlen == b.seqlen and torch.allclose(a.ssm, b.ssm, atol=1e-4, rtol=1e-4) and torch.allclose(
        a.conv, b.conv, atol=1e-4, rtol=1e-4)


def test_zerogpu_path_replies_like_the_local_path(zero_lm, lm, settings):
    assert lm.gpu is None and zero_lm.gpu is not None
    here, there = Conversation(lm, settings), Conversation(zero_lm, settings)
    for q in ("Hello!", "What is 3 plus 4?"):
        run(here.send(q)), run(there.send(q))
        end = there.context_tokens
        assert there.turns[-1].reply_ids == here.turns[-1].reply_ids and end == here.context_tokens
        assert there.cache.snapshots[end].device.type == "cpu"
        assert same_state(there.cache.snapshots[end], here.cache.snapshots[end])
    assert there.last_metrics.cache_hit and there.last_metrics.prefilled_tokens == len(there.turns[-1].prompt_ids)
    check_last_reply(there)
    run(here.retry()), run(there.retry())
    assert there.turns[-1].reply_ids == here.turns[-1].reply_ids
    assert there.last_metrics.prefilled_tokens == len(there.turns[-1].prompt_ids)  # no snapshot before the reply


def test_zerogpu_path_stopped_reply_rebuilds_from_the_snapshot(zero_lm, lm, settings, request):
    forked = request.node.callspec.params["zero_lm"] == "forked"
    here, there = Conversation(lm, settings), Conversation(zero_lm, settings)
    run(here.send("Hello!")), run(there.send("Hello!"))
    gens = here.send("Tell me a long story."), there.send("Tell me a long story.")
    for _ in range(4):
        next(gens[0]), next(gens[1])
    gens[0].close(), gens[1].close()
    end, cut = there.context_tokens, there.turns[-1]
    assert cut.reply_ids == here.turns[-1].reply_ids and cut.finish_reason == "cancelled"
    assert end not in there.cache.snapshots  # the stopped call sent no state back
    copy = there.fork()  # before the next reply: a fork shares the session's prefix-cache namespace
    for conv in (here, there):
        run(conv.send("Go on."))
    # no state came back for the stopped turn: the next reply reads it again, from the state before it
    reread = len(cut.prompt_ids) + len(cut.reply_ids)
    assert there.last_metrics.rebuilt_tokens == reread and not there.last_metrics.cache_hit
    back = Conversation.import_bytes(copy.export(), lm, settings)  # export reads what it lacks on the GPU
    assert same_state(copy.cache.snapshots[end], here.cache.snapshots[end])
    run(back.send("Go on."))
    assert there.turns[-1].reply_ids == here.turns[-1].reply_ids == back.turns[-1].reply_ids
    check_last_reply(there)
