"""What a caller gives the scheduler (Request) and what it gets back (Reply).

A Request names every token of its prompt, not only the new ones: the scheduler finds the
longest prefix whose state it holds (serving/prefix_cache.py), reads only the rest, keeps states
where the caller asks (turn and message boundaries) and inside long prompts, and keeps the state
after the reply. A Reply is what the caller iterates (Progress while the prompt is read when
asked, then TokenEvents); its declared fields say where reading started and why, what was fed and
the state at the end.

Every submitted request ends exactly once: with its last token, an error, or a cancellation.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from ..engine import DecodeOptions, SamplingParams, State, StreamMetrics, TokenEvent
from ..engine.decode import PLAIN
from .prefix_cache import Node

# Where a reply's reading started (Reply.source)
HIT = "hit"  # from a state the prefix cache held (any kind: turn end, message boundary, checkpoint)
GIVEN = "given"  # from the state the caller handed in (Request.resume)
FRESH = "fresh"  # from the empty state: nothing before these tokens was expected to be kept
REBUILT = "rebuilt"  # fewer tokens were found than the caller expected (evicted): they were read again


class SchedulerBusy(RuntimeError):
    """Every row and every waiting place is taken; the message is for the user."""


class SchedulerClosed(RuntimeError):
    """The model this scheduler served was unloaded."""


class RequestRefused(ValueError):
    """A request this runner cannot serve as asked, refused before it starts; the message is for
    the user."""


class RequestFailed(RuntimeError):
    """This request alone failed inside the scheduler (other rows go on); the message is for the user."""


@dataclass(frozen=True)
class Request:
    tokens: Sequence[int]  # the whole prompt
    namespace: str = ""  # prefix-cache namespace (namespaces.py; its own unless sharing is on, or private)
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = 0  # 0: read the prompt only (its state is kept)
    stop_token_ids: tuple[int, ...] = ()
    keep_at: tuple[int, ...] = ()  # positions 0 < p <= len(tokens) where a state is kept (turn / message ends)
    tokenizer: object | None = None  # for each token's text; None: token ids only
    progress: bool = False  # yield Progress after each piece of the prompt
    cache: bool = True  # look up and keep states in the prefix cache; False: only `resume` is used
    resume: State | None = None  # a state the caller hands over (advanced in place) holding tokens[:resume_at]
    resume_at: int = 0
    expect: int = 0  # tokens the caller expected to find kept: finding fewer is REBUILT, not FRESH
    context: Sequence[int] = ()  # tokens before `tokens` that the repetition penalty also sees
    options: DecodeOptions = PLAIN  # log-probabilities, bias, penalties, min length, grammar
    n: int = 1  # replies to this prompt: it is read once, then its state is copied into n rows
    prompt_logprobs: int | None = None  # k: each prompt token's log-probability and k alternatives


def refuse_beyond(req: Request, runner: str, options: bool) -> None:
    """Refuse, in words for the user, what a runner that streams one reply per call cannot do:
    n > 1 and prompt log-probabilities (and, where `options` is False, any DecodeOptions)."""
    if req.n != 1:
        raise RequestRefused(f"n > 1 is not served {runner}: send one request per reply")
    if req.prompt_logprobs is not None:
        raise RequestRefused(f"prompt log-probabilities are not served {runner}")
    if not options and req.options != PLAIN:
        raise RequestRefused(f"log-probabilities, logit bias, frequency and presence penalties, min_tokens and "
                         f"structured output are not served {runner}")


@dataclass(frozen=True)
class Progress:
    """Prompt tokens read so far (done of total), after each piece."""

    done: int
    total: int


_END = object()


@dataclass(eq=False)
class Reply:
    """A submitted request as the caller sees it. Iterate it; `close()` cancels.

    Filled in by the scheduler: `start`/`source` once admitted; `fed` with every token fed into
    the state (the events still queued for the caller included); `end_state` and `kept` when it
    ends; `error` when it failed.
    """

    request: Request
    metrics: StreamMetrics = field(default_factory=StreamMetrics)
    start: int = 0  # tokens of the prompt the state already held when reading began
    source: str = ""  # HIT | GIVEN | FRESH | REBUILT
    read: int = 0  # prompt tokens read so far
    fed: list[int] = field(default_factory=list)
    end_state: State | None = None  # the state after the prompt and `fed` (None: failed mid-read or step)
    kept: dict[int, Node] = field(default_factory=dict)  # position -> prefix-cache node kept for it
    error: BaseException | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error
    served_by: str = ""  # where it ran, when that is worth saying (a cluster replica)
    state_source: str = ""  # how the state got there, in words, where the runner knows more
    siblings: list[Reply] = field(default_factory=list)  # Request.n > 1: the other replies, in order
    # Request.prompt_logprobs: per prompt token (None for the first) its log-probability and the
    # likeliest alternatives, filled as the prompt is read
    prompt_logprobs: list[tuple[float, tuple[tuple[int, float], ...]] | None] = field(default_factory=list)
    out: queue.Queue = field(default_factory=queue.Queue, repr=False)
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    admitted: threading.Event = field(default_factory=threading.Event, repr=False)
    _cancel: object = field(default=None, repr=False)  # the scheduler's cancel(reply) callback
    _pull: Iterator | None = field(default=None, repr=False)  # a runner that yields its items itself
    _taken_end: bool = field(default=False, repr=False)

    @property
    def state(self) -> State | None:
        """The state after the reply so far (the resume state handed in, advanced in place)."""
        return self.end_state if self.end_state is not None else self.request.resume

    def __iter__(self) -> Iterator[Progress | TokenEvent]:
        return self

    def __next__(self) -> Progress | TokenEvent:
        if self._taken_end:
            raise StopIteration
        if self._pull is not None:
            try:
                return next(self._pull)
            except BaseException:
                self._taken_end = True
                raise
        item = self.out.get()
        if item is _END:
            self._taken_end = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._taken_end = True
            raise item
        return item

    def tokens(self) -> Iterator[TokenEvent]:
        """Only the TokenEvents."""
        return (ev for ev in self if isinstance(ev, TokenEvent))

    def close(self) -> list[TokenEvent]:
        """Cancel (if still running); returns once the scheduler let go of the row, with the token
        events that were fed into the state but not taken (so a transcript can match the state)."""
        if self._pull is not None:
            self._pull.close()
        elif not self._taken_end and self._cancel is not None:
            self._cancel(self)
        self._taken_end = True
        rest = []
        while True:
            try:
                item = self.out.get_nowait()
            except queue.Empty:
                self.out.put(_END)  # a reader blocked on another thread ends too
                return rest
            if isinstance(item, TokenEvent):
                rest.append(item)

    # -- the scheduler's side ------------------------------------------------------------------
    def _end(self, last: TokenEvent | BaseException | None, reason: str) -> None:
        if self.done.is_set():
            return
        self.finish_reason = reason
        if isinstance(last, BaseException):
            self.error = last
        if last is not None:
            self.out.put(last)
        if not isinstance(last, BaseException):
            self.out.put(_END)
        self.admitted.set()
        self.done.set()
