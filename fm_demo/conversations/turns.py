"""What a conversation is made of (Turn) and the errors it reports; shared by sessions.py (the
conversation) and transfer.py (its file format), so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass, field

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
