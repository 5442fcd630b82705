"""Prompt formats and per-turn token deltas.

Where an instruct checkpoint's tokenizer has a chat template, prompts are rendered by it
(templates.py: the TEMPLATE format below only says so). The hand-written formats here serve the
rest: BASE, the plain transcript of base models, and INSTRUCT, falcon-mamba-7b-instruct's format,
for an instruct checkpoint whose tokenizer has no template.

A conversation's token transcript is the concatenation, turn after turn, of
    prompt_ids(turn)  = [closing of the previous reply] + [system block] + user block + assistant prefix
    reply_ids(turn)   = the tokens the model generated (its stop token included, when it stopped)
and the recurrent state holds exactly these tokens. Each new turn therefore costs only its
prompt delta. The invariant the tests check: concatenating the deltas and the replies gives the
same ids as encoding the whole rendered transcript from scratch (`render` + `encode`).

Why deltas are split where they are: the recurrent state after a finished instruct reply ends with
the model's own <|im_end|>, so the next delta starts with the "\\n" the template puts after it;
after a stopped or cut reply the delta starts with the <|im_end|> the model never wrote. Every
delta boundary of the instruct format falls on a special token, which tokenizers never merge
across, so encoding piecewise equals encoding the whole text.

Special-token strings typed by a user are read as special tokens, as transformers'
apply_chat_template does; that can only affect the user's own conversation.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from . import templates
from .stops import first_stop, partial_stop

Message = dict[str, str]


@dataclass(frozen=True)
class ChatFormat:
    name: str
    system: tuple[str, str]  # text before / after the system prompt
    user: tuple[str, str]  # text before / after a user message
    assistant_prefix: str  # read after the user block; the reply follows it
    turn_end: str  # closes a reply; the instruct model writes it itself (a stop token)
    turn_sep: str  # written after turn_end, before the next block
    reply_lead: str = ""  # what separates assistant_prefix from a rendered reply's text
    stop_strings: tuple[str, ...] = ()  # text that ends a reply (base models keep going otherwise)
    template: bool = False  # rendered by the tokenizer's chat template (templates.py), not by these strings
    stop_ids: tuple[int, ...] = ()  # the checkpoint's own stop tokens (its generation config's eos ids)
    tokenizer: Any = field(default=None, compare=False, repr=False)  # the template's, when template


# falcon-mamba-7b-instruct: <|im_start|>role\n...<|im_end|>\n, generation prompt <|im_start|>assistant\n
INSTRUCT = ChatFormat(
    name="falcon-mamba-instruct",
    system=("<|im_start|>system\n", "<|im_end|>\n"),
    user=("<|im_start|>user\n", "<|im_end|>\n"),
    assistant_prefix="<|im_start|>assistant\n",
    turn_end="<|im_end|>",
    turn_sep="\n",
)

# A base model has no chat format; a plain transcript is what it continues most naturally.
BASE = ChatFormat(
    name="plain-transcript",
    system=("", "\n\n"),
    user=("User: ", "\n"),
    assistant_prefix="Assistant:",
    turn_end="",
    turn_sep="\n",
    reply_lead=" ",
    stop_strings=("\nUser:",),
)


# The checkpoint's own chat template (transformers' apply_chat_template) renders the prompts.
TEMPLATE = ChatFormat(name="chat-template", system=("", ""), user=("", ""), assistant_prefix="",
                      turn_end="", turn_sep="", template=True)


def format_for(kind: str, tokenizer=None, eos: Iterable[int] | int | None = ()) -> ChatFormat:
    """The prompt format of a `kind` model: an instruct tokenizer's chat template where it has one
    (its stop tokens: `eos`, the generation config's eos ids); a base model continues a plain
    transcript, whatever template its tokenizer carries (the bundled tiny base shares the instruct
    tokenizer's)."""
    if kind == "instruct":
        if tokenizer is not None and templates.has_template(tokenizer):
            return replace(TEMPLATE, stop_ids=tuple(sorted(_ids(eos))), tokenizer=tokenizer)
        return INSTRUCT
    if kind == "base":
        return BASE
    raise ValueError(f"unknown model kind '{kind}' (base or instruct)")


def _ids(extra: Iterable[int] | int | None) -> set[int]:
    if isinstance(extra, int):
        extra = [extra]
    return {int(i) for i in extra or ()}


# -- text ------------------------------------------------------------------------------------
def render(fmt: ChatFormat, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The whole transcript as text, as the tokenizer's chat template would write it."""
    if fmt.template:
        return templates.render(fmt.tokenizer, messages, add_generation_prompt)
    out = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            out += [fmt.system[0], content, fmt.system[1]]
        elif role == "user":
            out += [fmt.user[0], content, fmt.user[1]]
        elif role == "assistant":
            out += [fmt.assistant_prefix, fmt.reply_lead, content, fmt.turn_end, fmt.turn_sep]
        else:
            raise ValueError(f"unknown role '{role}'")
    if add_generation_prompt:
        out.append(fmt.assistant_prefix)
    return "".join(out)


def encode_messages(fmt: ChatFormat, tokenizer,
                    messages: Sequence[Message]) -> tuple[list[int], tuple[int, ...]]:
    """(ids, ends): the encoding of render(messages, generation prompt), and the token positions
    where each message ends. States kept there serve every later request that shares those
    messages (one system prompt for many users, one document asked many questions). A position is
    given only where no token straddles the boundary, so the prefix encodes the same alone. One
    tokenizer call gives both (a slow tokenizer without offsets gives no positions). A chat
    template's ends come from rendering each prefix of the messages (templates.message_ends)."""
    if fmt.template:
        ids = templates.encode(tokenizer, templates.render(tokenizer, messages, add_generation_prompt=True))
        return ids, templates.message_ends(tokenizer, messages, ids)
    text = render(fmt, messages, add_generation_prompt=True)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        return encode(tokenizer, text), ()
    starts = [s for s, _ in offsets]
    out, chars = [], 0
    for m in messages:
        chars += len(render(fmt, [m]))
        n = bisect.bisect_left(starts, chars)  # tokens starting before the boundary
        if 0 < n < len(ids) and offsets[n - 1][1] <= chars:
            out.append(n)
    return ids, tuple(dict.fromkeys(out))


def prompt_text(fmt: ChatFormat, user_text: str, *, first: bool, system: str = "",
                prev_reply_closed: bool = True) -> str:
    """Text read before the reply to `user_text`.

    first: no earlier turn (the system block goes here). prev_reply_closed: the previous reply
    ends with the format's turn end (the model wrote it); otherwise the delta writes it.
    """
    parts = []
    if first:
        if system:
            parts += [fmt.system[0], system, fmt.system[1]]
    else:
        if not prev_reply_closed:
            parts.append(fmt.turn_end)
        parts.append(fmt.turn_sep)
    parts += [fmt.user[0], user_text, fmt.user[1], fmt.assistant_prefix]
    return "".join(parts)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without any BOS/EOS the tokenizer might add on its own."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def turn_end_id(fmt: ChatFormat, tokenizer) -> int | None:
    """The single token id of fmt.turn_end, or None when it is not one token."""
    if not fmt.turn_end:
        return None
    ids = encode(tokenizer, fmt.turn_end)
    return ids[0] if len(ids) == 1 else None


def prompt_ids(fmt: ChatFormat, tokenizer, user_text: str, prev_reply_ids: Sequence[int] | None,
               system: str = "") -> list[int]:
    """Token delta before the reply to `user_text`; prev_reply_ids is None for the first turn."""
    if fmt.template:  # what a template writes after a reply depends on the whole conversation
        raise ValueError("a chat template's prompt follows the whole conversation: chat.next_prompt")
    end = turn_end_id(fmt, tokenizer)
    closed = bool(prev_reply_ids) and end is not None and prev_reply_ids[-1] == end
    text = prompt_text(fmt, user_text, first=prev_reply_ids is None, system=system,
                       prev_reply_closed=closed or not fmt.turn_end)
    return encode(tokenizer, text)


def next_prompt(fmt: ChatFormat, tokenizer, turns: Sequence[templates.PastTurn], user_text: str,
                system: str = "") -> templates.Extension:
    """The prompt after `turns` for a new user message: a chat template's (templates.extend: it
    may rewrite the earlier turns' tokens), or the hand-written format's delta."""
    if fmt.template:
        return templates.extend(tokenizer, system, turns, user_text, stop_token_ids(fmt, tokenizer))
    prev = turns[-1].reply_ids if turns else None
    return templates.Extension(prompt_ids(fmt, tokenizer, user_text, prev, system=system))


def stop_token_ids(fmt: ChatFormat, tokenizer, extra: Iterable[int] | int | None = ()) -> set[int]:
    """Ids that end a reply: the tokenizer's eos, the format's turn end, the model's own eos ids
    (a template format carries them: its generation config's, e.g. Falcon3-Mamba's [10, 11])."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if (end := turn_end_id(fmt, tokenizer)) is not None:
        ids.add(end)
    return ids | set(fmt.stop_ids) | _ids(extra)


# -- replies ---------------------------------------------------------------------------------
def visible_reply(fmt: ChatFormat, text: str, final: bool) -> tuple[str, bool]:
    """(text safe to show, whether a stop string was reached) for a reply decoded so far.

    While streaming, a tail that could still become a stop string is held back.
    """
    cut = first_stop(text, fmt.stop_strings)
    if cut >= 0:
        return _tidy(fmt, text[:cut]), True
    if not final:
        text = text[:len(text) - partial_stop(text, fmt.stop_strings)]
    return _tidy(fmt, text), False


def tokens_within(tokenizer, ids: Sequence[int], n_chars: int) -> int:
    """The largest n such that ids[:n] decodes to at most n_chars characters (binary search)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=True)) <= n_chars:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _tidy(fmt: ChatFormat, text: str) -> str:
    if fmt.reply_lead and text.startswith(fmt.reply_lead):
        text = text[len(fmt.reply_lead):]
    return text
