"""What travels between the ingress and a model replica, one reply at a time.

ingress -> replica: a ReplyRequest. It names the tokens the conversation's state holds (`prefix`)
and the tokens to read after them (`ids`), never text. The state itself travels only by
reference (an object in Ray's object store, fetched by the replica only when it lacks a state
of its own for that prefix), so a conversation that stays on its replica moves token ids only.

replica -> ingress: a stream of lists (a few per second per reply, so a fast model is not slowed
by one message per token), holding a ReplyStart, then Token tuples, then a ReplyEnd that carries
the state after the reply when it fits the copy budget: the ingress keeps it with the transcript,
so losing the replica loses no state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from ..engine import SamplingParams, State
from ..engine.sampling import revalidated

Key = tuple[str, str]  # (preset key, precision)

# How a replica came by the state a reply starts from (ReplyStart.source).
OWN_CACHE = "own cache"  # it still held a state for (a prefix of) these tokens
COPIED = "copied"  # it took the state the ingress kept
REBUILT = "rebuilt"  # it read the conversation's tokens again
NEW = "new"  # nothing to resume: the request starts from the empty state


@dataclass
class ReplyRequest:
    key: Key
    namespace: str  # prefix-cache namespace: the browser session or API client
    prefix: list[int] | None  # tokens the sent state holds; None: unknown (the state alone counts)
    ids: list[int]  # tokens to read after them; a reply samples after the last one
    sampling: SamplingParams
    max_new_tokens: int  # 0: read only, and return the state
    stop_token_ids: tuple[int, ...] = ()
    state: Any = None  # ObjectRef of the State after `prefix`, or None (empty state / none kept)
    prefer: str | None = None  # the replica holding the longest prefix: a hint to the router
    copy_state_bytes: int = 0  # return the state after the reply when it is at most this big

    @property
    def tokens(self) -> list[int]:
        return [*(self.prefix or ()), *self.ids]


def checked_request(req: ReplyRequest) -> ReplyRequest:
    """`req` as a replica may serve it: its sampling checked under the engine's LIMITS again
    (SamplingError), since a request arrives unpickled and unpickling runs no __post_init__, and
    its reply length a whole number >= 0 (ValueError). Nothing is read before this passes."""
    n = req.max_new_tokens
    if type(n) is not int or n < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {n!r}")
    return replace(req, sampling=revalidated(req.sampling))


@dataclass
class ReplyStart:
    replica: str
    start: int  # tokens of the request the replica did not read again
    source: str  # OWN_CACHE | COPIED | REBUILT | NEW
    moved_bytes: int = 0  # state bytes fetched from the object store


class Token(NamedTuple):
    token_id: int
    finish_reason: str | None
    batch_size: int
    batch_mean: float
    prefill_s: float  # on the first token: time spent reading the prompt


@dataclass
class ReplyEnd:
    fed: int  # tokens generated and read into the replica's state (a stopped reply may be one ahead)
    state: State | None = None  # the state after prompt and reply, on CPU, when within the copy budget


@dataclass
class ModelInfo:
    """What the ingress needs of a model it does not hold: tokenizer, config, state layout."""

    key: Key
    tokenizer: Any
    config: Any  # transformers config
    generation_config: Any
    signature: str
    conv_dtype: Any  # torch dtype of State.conv
    chunk_size: int
    nbytes: int  # weights on each replica
    load_s: float
    notes: tuple[str, ...]
    kernels: dict[str, str]
    device: str  # the replica's device
    replica: str
