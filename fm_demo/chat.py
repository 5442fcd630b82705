"""Prompt formats and per-turn token deltas.

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
from dataclasses import dataclass
from typing import Iterable, Sequence

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


def format_for(kind: str) -> ChatFormat:
    if kind == "instruct":
        return INSTRUCT
    if kind == "base":
        return BASE
    raise ValueError(f"unknown model kind '{kind}' (base or instruct)")


# -- text ------------------------------------------------------------------------------------
def render(fmt: ChatFormat, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The whole transcript as text, as the tokenizer's chat template would write it."""
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
    tokenizer call gives both (a slow tokenizer without offsets gives no positions)."""
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
    end = turn_end_id(fmt, tokenizer)
    closed = bool(prev_reply_ids) and end is not None and prev_reply_ids[-1] == end
    text = prompt_text(fmt, user_text, first=prev_reply_ids is None, system=system,
                       prev_reply_closed=closed or not fmt.turn_end)
    return encode(tokenizer, text)


def stop_token_ids(fmt: ChatFormat, tokenizer, extra: Iterable[int] | int | None = ()) -> set[int]:
    """Ids that end a reply: the tokenizer's eos, the format's turn end, the model's own eos ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if (end := turn_end_id(fmt, tokenizer)) is not None:
        ids.add(end)
    if isinstance(extra, int):
        extra = [extra]
    return ids | {int(i) for i in extra or ()}


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


def template_mismatch(fmt: ChatFormat, tokenizer) -> str | None:
    """None when the tokenizer's own chat template renders a sample exactly as `fmt` does."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    sample = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    ours = render(fmt, sample, add_generation_prompt=True)
    theirs = tokenizer.apply_chat_template(sample, tokenize=False, add_generation_prompt=True)
    if ours == theirs:
        return None
    return f"chat template differs from the {fmt.name} format: {theirs!r} vs {ours!r}"
