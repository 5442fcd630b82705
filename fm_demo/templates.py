"""Prompts rendered by the checkpoint's own chat template (transformers' apply_chat_template).

An instruct checkpoint says how it was trained to see a conversation in its tokenizer config's
chat template (Jinja): falcon-mamba-7b-instruct writes `<|im_start|>role\\n...<|im_end|>\\n`,
Falcon3-Mamba-7B-Instruct `<|user|>\\n...`, a fine-tune whatever it was trained on. Every prompt is
the whole conversation rendered by that template with the generation prompt, tokenized; the
scheduler then reads only what its prefix cache does not hold.

A conversation's transcript keeps the reply tokens the model generated (what its state holds),
so a new turn appends only the text the rendering has after them (`extend`): the closing the
model did not write itself, the new user message and the generation prompt. That holds while the
template is prefix-stable: rendering N+1 turns starts with the text of N turns plus the reply.
A template that rewrites earlier turns (some drop the reasoning of past replies) breaks it; the
transcript is then the new rendering's tokens, cut into turns again (`_rewrite`), and the reply
re-reads from where the rendering changed. `check` tries a sample conversation at load.

The transcript is compared with a rendering as text: each prompt's tokens decoded (they are the
template's own text) and each reply as shown (what the template renders). A model may generate a
reply in other pieces than the tokenizer would cut its text into, or with special tokens that
never show; those tokens stay, since the state holds them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

Message = dict[str, str]
REWRITE_REASON = "the chat template rewrote earlier turns"
# A system prompt, two exchanges and a third question: enough for a template to show whether it
# renders past turns as it rendered them when they were the latest.
SAMPLE_SYSTEM = "Be brief."
SAMPLE = (("Hi there", "Hello! How can I help?"), ("What is 2+2?", "4."), ("And 3+3?", ""))


class PastTurn(Protocol):
    """What `extend` reads of an earlier turn (conversations' Turn has these fields)."""

    user: str
    reply: str  # the reply as shown: what the template renders as the assistant's message
    prompt_ids: list[int]
    reply_ids: list[int]


@dataclass
class Extension:
    """The next prompt of a conversation: `prompt` follows the (possibly rewritten) earlier turns.

    layout: None when the earlier turns' tokens stay as they are; else their new
    (prompt_ids, reply_ids), one pair per turn, and changed_at the first position that differs.
    """

    prompt: list[int]
    layout: list[tuple[list[int], list[int]]] | None = None
    changed_at: int = 0


@dataclass
class _SampleTurn:
    user: str
    reply: str
    prompt_ids: list[int]
    reply_ids: list[int]


@dataclass(frozen=True)
class TemplateCheck:
    prefix_stable: bool
    note: str


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    """Ids of `text` as apply_chat_template(tokenize=True) gives them: no BOS/EOS added (a
    template writes those itself)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def conversation(system: str, turns: Sequence[PastTurn], user_text: str | None) -> list[Message]:
    """The messages of a conversation: system, each turn's user message and reply as shown."""
    out = [{"role": "system", "content": system}] if system else []
    for t in turns:
        out += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.reply}]
    if user_text is not None:
        out.append({"role": "user", "content": user_text})
    return out


def extend(tokenizer, system: str, turns: Sequence[PastTurn], user_text: str,
           stop_ids: Collection[int]) -> Extension:
    """The prompt that follows `turns` for a new user message: the whole conversation rendered
    with the generation prompt, less the text the transcript already holds."""
    whole = render(tokenizer, conversation(system, turns, user_text), add_generation_prompt=True)
    if not turns:
        return Extension(encode(tokenizer, whole))
    rest = _rest(tokenizer, whole, turns, stop_ids)
    if rest is not None:
        return Extension(encode(tokenizer, rest))
    held = [i for t in turns for i in (*t.prompt_ids, *t.reply_ids)]
    return _rewrite(tokenizer, system, turns, user_text, whole, held, stop_ids)


def _rest(tokenizer, whole: str, turns: Sequence[PastTurn], stop_ids: Collection[int]) -> str | None:
    """The text of `whole` after what the transcript holds, or None where the rendering differs.

    A reply that ended with a stop token other than the closing the template writes there (the
    tiny instruct model may end with <|endoftext|> where its template writes <|im_end|>) keeps
    it: the state holds it; the template's closing is read after it, in the next prompt."""
    pos = 0
    for t in turns:
        for piece in (tokenizer.decode(t.prompt_ids, skip_special_tokens=False), t.reply):
            if not whole.startswith(piece, pos):
                return None
            pos += len(piece)
        if t.reply_ids and t.reply_ids[-1] in stop_ids:
            end = tokenizer.decode(t.reply_ids[-1:], skip_special_tokens=False)
            pos += len(end) if whole.startswith(end, pos) else 0
    return whole[pos:]


def _rewrite(tokenizer, system: str, turns: Sequence[PastTurn], user_text: str, whole: str,
             held: list[int], stop_ids: Collection[int]) -> Extension:
    """The template rendered earlier turns otherwise than the transcript holds them: the new
    rendering's tokens, cut into the same turns. Turn i's reply starts where the conversation up
    to its user message, rendered with the generation prompt, ends (where those tokens are a
    prefix of the whole) and ends after the first stop token that follows (its closing)."""
    ids = encode(tokenizer, whole)
    starts = [_prefix_length(ids, encode(tokenizer, render(
        tokenizer, conversation(system, turns[:i], turns[i].user), add_generation_prompt=True)))
        for i in range(len(turns))]
    layout, begin = [], 0
    for i, start in enumerate(starts):
        r = max(begin, start if start is not None else begin)
        bound = next((s for s in starts[i + 1:] if s is not None), len(ids))
        end = next((j + 1 for j in range(r, bound) if ids[j] in stop_ids), r)
        layout.append((ids[begin:r], ids[r:end]))
        begin = end
    changed = 0
    for a, b in zip(held, ids):
        if a != b:
            break
        changed += 1
    return Extension(ids[begin:], layout, changed)


def _prefix_length(ids: list[int], own: list[int]) -> int | None:
    """len(own) where `own` is a prefix of `ids` (a clean boundary), else None."""
    return len(own) if ids[:len(own)] == own else None


def message_ends(tokenizer, messages: Sequence[Message], ids: list[int]) -> tuple[int, ...]:
    """Positions in `ids` (the whole rendering) where each message's rendering ends: the tokens
    of the messages up to there rendered alone, kept only where they are a prefix of `ids`."""
    out = []
    for i in range(len(messages)):
        own = encode(tokenizer, render(tokenizer, messages[:i + 1]))
        if 0 < len(own) < len(ids) and ids[:len(own)] == own:
            out.append(len(own))
    return tuple(sorted(set(out)))


def check(tokenizer, stop_ids: Collection[int]) -> TemplateCheck:
    """Render SAMPLE whole and turn by turn (each reply as the model would write it: its text's
    tokens and the stop token the template closes it with) and say whether they agree."""
    system, turns = SAMPLE_SYSTEM, []
    try:
        for user, reply in SAMPLE:
            ext = extend(tokenizer, system, turns, user, stop_ids)
            whole = encode(tokenizer, render(tokenizer, conversation(system, turns, user), True))
            built = [i for t in turns for i in (*t.prompt_ids, *t.reply_ids)] + ext.prompt
            if ext.layout is not None or built != whole:
                return TemplateCheck(False, "chat template: rewrites earlier turns (a turn after such a "
                                            "rewrite re-reads the conversation from where it changed)")
            text = encode(tokenizer, reply)
            after = encode(tokenizer, render(tokenizer, conversation(
                system, [*turns, _SampleTurn(user, reply, [], [])], "?"), True))
            closing = after[len(built) + len(text):][:1]
            turns.append(_SampleTurn(user, reply, ext.prompt, text + [i for i in closing if i in stop_ids]))
    except Exception as e:  # a template is code from the checkpoint: any error is reported, not raised
        return TemplateCheck(False, f"chat template: could not render a sample conversation ({e})")
    return TemplateCheck(True, "chat template: prefix-stable (a turn reads only its new tokens)")

