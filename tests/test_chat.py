"""Prompt formats: per-turn token deltas concatenate to the whole transcript encoded at once."""

from __future__ import annotations

import pytest
from tiny_fixtures import bundled_checkpoint

from fm_demo import chat

CONVERSATIONS = [
    [("Hello!", "Hi, how can I help?"), ("What is 2+3?", "5"), ("Thanks.", "You're welcome.")],
    [("  leading spaces", "a reply\nwith two lines"), ("digits 12345 and ünïcode ✓", "ok!"),
     ("ends with newline\n", "fine")],
    [("One", "")],  # an empty reply (the model ended its turn at once)
]


@pytest.fixture(scope="module")
def tokenizer():
    """The bundled tiny tokenizer with Falcon Mamba's chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_checkpoint("instruct"))


def _messages(pairs, system=""):
    out = [{"role": "system", "content": system}] if system else []
    for user, reply in pairs:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return out


def _deltas(fmt, tok, pairs, system, closed: bool):
    """Token transcript built turn by turn, as a Conversation builds it.

    closed: each reply ends with the model's own turn-end token (instruct replies that finished);
    otherwise the next delta writes it (stopped or cut replies).
    """
    ids, prev = [], None
    end = chat.turn_end_id(fmt, tok)
    for user, reply in pairs:
        ids += chat.prompt_ids(fmt, tok, user, prev, system=system)
        prev = chat.encode(tok, fmt.reply_lead + reply) + ([end] if closed and end is not None else [])
        ids += prev
    return ids


@pytest.mark.parametrize("pairs", CONVERSATIONS)
@pytest.mark.parametrize("system", ["", "You are a falcon."])
@pytest.mark.parametrize("closed", [True, False])
def test_instruct_deltas_equal_whole_encoding(tokenizer, pairs, system, closed):
    fmt = chat.INSTRUCT
    whole = chat.render(fmt, _messages(pairs, system))
    built = _deltas(fmt, tokenizer, pairs, system, closed)
    expect = chat.encode(tokenizer, whole)
    # the transcript ends right after the last reply's turn end (its "\n" belongs to the next delta)
    assert built + chat.encode(tokenizer, fmt.turn_sep) == expect if closed else built + chat.encode(
        tokenizer, fmt.turn_end + fmt.turn_sep) == expect


@pytest.mark.parametrize("pairs", CONVERSATIONS[:2])
def test_instruct_generation_prompt_delta(tokenizer, pairs):
    fmt, msgs = chat.INSTRUCT, _messages(pairs)
    history = _deltas(fmt, tokenizer, pairs, "", closed=True)
    delta = chat.prompt_ids(fmt, tokenizer, "Next?", history[-1:])
    full = chat.render(fmt, msgs + [{"role": "user", "content": "Next?"}], add_generation_prompt=True)
    assert history + delta == chat.encode(tokenizer, full)


def test_render_matches_the_tokenizer_chat_template(tokenizer):
    msgs = _messages(CONVERSATIONS[0], system="Be brief.") + [{"role": "user", "content": "More?"}]
    assert chat.render(chat.INSTRUCT, msgs, True) == tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("pairs", CONVERSATIONS[:1])
def test_base_transcript_deltas(tokenizer, pairs):
    fmt = chat.BASE
    built = _deltas(fmt, tokenizer, pairs, "A chat.", closed=False)
    whole = chat.render(fmt, _messages(pairs, "A chat."))
    assert chat.encode(tokenizer, whole) == built + chat.encode(tokenizer, fmt.turn_sep)
    assert whole.startswith("A chat.\n\nUser: Hello!\nAssistant: Hi,")


def test_stop_tokens(tokenizer):
    stops = chat.stop_token_ids(chat.INSTRUCT, tokenizer, [0])
    assert chat.encode(tokenizer, "<|im_end|>")[0] in stops and 0 in stops
    assert chat.stop_token_ids(chat.BASE, tokenizer) == {tokenizer.eos_token_id}


@pytest.mark.parametrize("raw, final, shown, hit", [
    (" Hello", False, "Hello", False),
    (" Hello\nUs", False, "Hello", False),  # could become "\nUser:": held back
    (" Hello\nUs", True, "Hello\nUs", False),  # the reply ended: nothing to hold back
    (" Hello\nUser: and more", False, "Hello", True),
    (" Hello\nUsual", False, "Hello\nUsual", False),
])
def test_visible_reply_holds_back_stop_strings(raw, final, shown, hit):
    assert chat.visible_reply(chat.BASE, raw, final) == (shown, hit)


def test_unknown_kind_and_role():
    with pytest.raises(ValueError, match="kind"):
        chat.format_for("chat")
    with pytest.raises(ValueError, match="role"):
        chat.render(chat.INSTRUCT, [{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("kind", ["instruct", "base"])
def test_message_ends_are_where_each_prefix_of_the_conversation_encodes_alone(tokenizer, kind):
    fmt = chat.format_for(kind)
    msgs = _messages([("What is 2 plus 2?", "4."), ("And 3 plus 3?", "6.")], system="Be brief. " * 20)
    msgs.append({"role": "user", "content": "Thanks!"})
    ids, ends = chat.encode_messages(fmt, tokenizer, msgs)
    assert ids == chat.encode(tokenizer, chat.render(fmt, msgs, add_generation_prompt=True))
    assert len(ends) == len(msgs) and list(ends) == sorted(ends)
    for i, n in enumerate(ends):
        assert ids[:n] == chat.encode(tokenizer, chat.render(fmt, msgs[:i + 1]))
