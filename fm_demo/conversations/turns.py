"""What a conversation is made of (Turn, and the branches it keeps: Fork, Branch) and the errors
it reports; shared by sessions.py (the conversation) and transfer.py (its file format), so neither
imports the other.

Branches: retry, an edited message, "Show N replies" and a rewind to a token never throw a path
away. Where a conversation went another way at turn i, a Fork at i lists the versions of turn i
and all that followed it; the one shown is the conversation's own turns (its slot in the fork is
None), every other is a Branch holding its turns, the forks inside them, and references to the
prefix-cache states it had (so switching back reads nothing while they stay cached)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..metrics import ReplyMetrics


class ConversationError(ValueError):
    """A request a conversation cannot serve; the message is for the user."""


class ConversationBusy(ConversationError):
    pass


class ImportRefused(ConversationError):
    pass


@dataclass
class Turn:
    user: str
    prompt_ids: list[int]  # delta read before the reply (chat.next_prompt)
    reply_ids: list[int] = field(default_factory=list)  # generated tokens, all of them in the state
    reply: str = ""  # text shown for the reply
    finish_reason: str | None = None
    metrics: ReplyMetrics | None = None
    keep_at: int | None = None  # a point inside prompt_ids worth a state of its own (a document's end)
    logprobs: list | None = None  # per reply token: (log-probability, ((id, log-probability), ...) likeliest first)

    def copy(self) -> Turn:
        return Turn(self.user, list(self.prompt_ids), list(self.reply_ids), self.reply, self.finish_reason,
                    self.metrics, self.keep_at, None if self.logprobs is None else list(self.logprobs))


def layout(turns: list[Turn]) -> list[tuple[list[int], list[int]]]:
    """The turns as tokens (prompt, reply): what a Branch records of the turns before it."""
    return [(list(t.prompt_ids), list(t.reply_ids)) for t in turns]


MAX_BRANCHES = 16  # versions one fork keeps: beyond, the oldest one not shown leaves


@dataclass
class Branch:
    """A version of a conversation from one turn on that is not shown: its turns, the forks inside
    them (by turn index in the whole conversation), the states it holds ({position: prefix-cache
    node}, positions it expects a state at) and its last readout."""

    turns: list[Turn]
    forks: dict[int, Fork] = field(default_factory=dict)
    refs: dict[int, Any] = field(default_factory=dict)
    known: set[int] = field(default_factory=set)
    metrics: ReplyMetrics | None = None
    prefix: list[tuple[list[int], list[int]]] = field(default_factory=list)  # the turns before it, as tokens then


@dataclass
class Fork:
    """The versions of turn `index` on: branches[active] is None (the conversation's own turns)."""

    branches: list[Branch | None]
    active: int = 0
    prev: int = 0  # the version shown before the one being written (shown again if it comes to nothing)

    def __post_init__(self) -> None:
        assert self.branches[self.active] is None
