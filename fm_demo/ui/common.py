"""What every tab shares: the app context, session ids, the reply loop and Stop, errors, formats.

Handlers are plain functions of (context, inputs, request); tests call them with a
`gr.Request(session_hash=...)` and no browser; inputs.py binds them for Gradio. Per-session
objects live in the SessionStore and in StopFlags, both keyed by the Gradio session hash and owned
by the context build_demo makes.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple, TypeVar

import gradio as gr

from ..conversations.turns import ConversationError
from ..engine import StateError
from ..engine.sampling import SamplingError
from ..models import ModelLoadError, ModelManager
from ..serving import RequestFailed, SchedulerBusy, SchedulerClosed
from ..settings import PRECISION_LABELS, GiB, MiB, Settings, SettingsError

if TYPE_CHECKING:
    from ..conversations.store import SessionStore

log = logging.getLogger("fm_demo.ui")
T = TypeVar("T")

UPDATES_PER_S = 15.0  # streaming refresh rate of one reply: smooth to the eye, cheap for the browser
# Every update costs the server's event loop about 0.65 ms of CPU under the GIL (Gradio's
# postprocessing and SSE), taken from the scheduler's decode steps: 16 replies at 15 Hz cost a
# quarter of what batching gains. So all streaming replies together get this many updates a second.
TOTAL_UPDATES_PER_S = 60.0


class StreamCount:
    """How many replies stream right now (each takes a share of TOTAL_UPDATES_PER_S)."""

    def __init__(self) -> None:
        self._n, self._lock = 0, threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self._n += n

    def hz(self) -> float:
        return min(UPDATES_PER_S, TOTAL_UPDATES_PER_S / max(1, self._n))


@dataclass
class StopFlags:
    """A stop request per (session, slot): set by the Stop button, read between tokens."""

    _flags: dict[tuple[str, str], threading.Event] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def arm(self, session_id: str, slot: str) -> threading.Event:
        """A fresh, unset flag for a reply that is about to start."""
        with self._lock:
            flag = self._flags[(session_id, slot)] = threading.Event()
        return flag

    def stop(self, session_id: str, slot: str | None = None) -> None:
        with self._lock:
            for (sid, s), flag in self._flags.items():
                if sid == session_id and slot in (None, s):
                    flag.set()

    def forget(self, session_id: str) -> None:
        with self._lock:
            for key in [k for k in self._flags if k[0] == session_id]:
                del self._flags[key]


@dataclass
class AppContext:
    """Everything the handlers share; build_demo creates one per app and closes over it."""

    settings: Settings
    manager: ModelManager
    store: SessionStore
    stops: StopFlags = field(default_factory=StopFlags)
    streams: StreamCount = field(default_factory=StreamCount)
    # the app's one folder of exported conversations (see sweep), and the files written there,
    # which build_demo hands to Gradio's delete_cache as well
    exports: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fm-demo-exports-")))
    export_files: set[str] = field(default_factory=set)


def sweep(folder: Path, age_s: float) -> int:
    """Delete the files in `folder` last modified more than age_s seconds ago; returns how many."""
    cutoff, gone = time.time() - age_s, 0
    for path in folder.iterdir():
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                gone += 1
        except FileNotFoundError:  # another export's sweep took it first
            continue
    return gone


def delete_cache(settings: Settings) -> tuple[int, int]:
    """gr.Blocks' delete_cache, (every how many seconds, files older than how many): uploads and
    Gradio's copies of outputs (exports) older than Settings.temp_file_age_s, checked four times
    per that age; all of them when the server stops."""
    age = settings.temp_file_age_s
    return max(1, age // 4), age


def reply_concurrency(ctx: AppContext) -> int | None:
    """How many reply events Gradio runs at once. Unbounded: each model's scheduler decides who
    decodes, who waits and who hears at once that the server is busy (a cap here would queue the
    rest in Gradio instead); on ZeroGPU each event holds a GPU slice, so the setting bounds them."""
    from ..zerogpu import on_zerogpu

    return ctx.settings.concurrency_limit if on_zerogpu() else None


def session_id(request: gr.Request | None) -> str:
    sid = getattr(request, "session_hash", None)
    if not sid:
        raise gr.Error("This request has no session; reload the page.")
    return sid


def check_message(text: str | None, limit: int) -> str | None:
    """The message to send, None for an empty one (ignored); refuses an oversized one."""
    text = (text or "").strip()
    if not text:
        return None
    if len(text) > limit:
        raise gr.Error(
            f"That message is {len(text):,} characters; the limit is {limit:,}. "
            "Use the Long context tab for long documents."
        )
    return text


def _is_done(event: object) -> bool:
    return bool(getattr(event, "done", False))


def throttle(
    events: Iterable[T],
    hz: float | Callable[[], float] = UPDATES_PER_S,
    is_last: Callable[[T], bool] = _is_done,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[T]:
    """Pass at most `hz` events per second by `clock` (a rate, or a function read per event),
    always including the first and the last."""
    rate = hz if callable(hz) else (lambda: hz)
    last_t, pending = -math.inf, None
    for event in events:
        now = clock()
        if is_last(event) or now - last_t >= 1.0 / rate():
            yield event
            last_t, pending = now, None
        else:
            pending = event
    if pending is not None:
        yield pending


# The domain's errors, whose message is written for the user (ConversationError covers ImportRefused
# and ConversationBusy; SamplingError names the setting and its range, e.g. as a cluster replica
# refuses a request). Anything else, a bare ValueError included, is a bug: logged with its trace,
# and the user is told only that something went wrong.
USER_FACING = (SettingsError, StateError, ConversationError, ModelLoadError, SchedulerBusy, SchedulerClosed,
               RequestFailed, SamplingError, MemoryError)


def to_user_error(e: BaseException) -> gr.Error:
    if isinstance(e, gr.Error):
        return e
    if type(e).__name__ == "OutOfMemoryError":
        return gr.Error("The device ran out of memory. Try a shorter input, fewer new tokens, or 4-bit.")
    if isinstance(e, USER_FACING):
        return gr.Error(str(e))
    log.error("unexpected error in a handler", exc_info=e)
    return gr.Error(
        f"Something went wrong on the server ({type(e).__name__}). "
        "The details are in the server log; try again or reload the page."
    )


def user_errors(fn: Callable) -> Callable:
    """Turn exceptions into gr.Error with a human message, for plain and generator handlers."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:
                raise to_user_error(e) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise to_user_error(e) from None

    return wrapper


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n)} B"


def fmt_rate(tok_s: float | None) -> str:
    return "n/a" if not tok_s else f"{tok_s:,.1f} tok/s"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1000:,.0f} ms" if s < 1 else f"{s:,.2f} s"


# -- model pickers -----------------------------------------------------------------------------
def preset_choices(settings: Settings) -> list[tuple[str, str]]:
    return [(p.label, key) for key, p in settings.presets().items()]


def precision_choices(settings: Settings, preset_key: str) -> list[tuple[str, str]]:
    return [(PRECISION_LABELS.get(p, p), p) for p in settings.preset(preset_key).precisions]


def model_pickers(
    settings: Settings, preset_key: str, label: str = "Model", elem_prefix: str | None = None
) -> tuple[gr.Dropdown, gr.Dropdown]:
    """A preset dropdown and a precision dropdown (the tab wires on_preset_change between them)."""
    ids = (f"{elem_prefix}-model", f"{elem_prefix}-precision") if elem_prefix else (None, None)
    preset = gr.Dropdown(
        preset_choices(settings), value=preset_key, label=label, interactive=True, elem_id=ids[0]
    )
    precision = gr.Dropdown(
        precision_choices(settings, preset_key),
        value=settings.precision_for(preset_key),
        label="Precision",
        interactive=True,
        elem_id=ids[1],
    )
    return preset, precision


def on_preset_change(settings: Settings, preset_key: str) -> gr.Dropdown:
    return gr.Dropdown(
        choices=precision_choices(settings, preset_key), value=settings.precision_for(preset_key)
    )


def load_progress(progress: gr.Progress | None) -> Callable[[float, str], None] | None:
    """Adapts gr.Progress to the model manager's progress(fraction, message) callback."""
    if progress is None:
        return None
    return lambda fraction, message: progress(fraction, desc=message)


# -- conversations -----------------------------------------------------------------------------
def open_conversation(
    ctx: AppContext,
    request: gr.Request | None,
    preset: str,
    precision: str | None,
    slot: str,
    progress: gr.Progress | None = None,
    system: str | None = None,
):
    """(session id, Conversation) for this browser session's `slot`, its model loaded first."""
    sid = session_id(request)
    conv = ctx.store.conversation(sid, preset, precision or None, slot=slot, progress=load_progress(progress))
    if system is not None:
        conv.set_system_prompt(system.strip())
    return sid, conv


# -- replies -----------------------------------------------------------------------------------
class Keyed(NamedTuple):
    """An event of one of several interleaved replies, with the key of its reply."""

    key: str
    event: Any

    @property
    def done(self) -> bool:
        return _is_done(self.event)


def interleave(streams: dict[str, Iterator]) -> Iterator[Keyed]:
    """(key, event) from each stream in turn until all are exhausted; closing it closes them all."""
    live = dict(streams)
    try:
        while live:
            for key, it in list(live.items()):
                event = next(it, None)
                if event is None:
                    del live[key]
                else:
                    yield Keyed(key, event)
    finally:
        for it in streams.values():
            it.close()


def controlled(
    ctx: AppContext, sid: str, slot: str, events: Iterator[T], first: T | None = None
) -> Iterator[T]:
    """A reply's events (after `first`, if given), throttled, ending when Stop is pressed in `slot`.

    The one loop every streaming handler runs its reply (or interleaved replies) through. The stop
    flag is armed now, so a Stop pressed before the first event counts too. Closing `events` is
    what stops the reply: the conversation keeps exactly the tokens shown.
    """
    return _until_stopped(ctx.stops.arm(sid, slot), events, first, ctx.streams)


def _until_stopped(flag: threading.Event, events: Iterator[T], first: T | None,
                   streams: StreamCount) -> Iterator[T]:
    streams.add(1)
    try:
        if first is not None:
            yield first
        for event in throttle(events, streams.hz):
            yield event
            if flag.is_set():
                break
    finally:
        streams.add(-1)
        events.close()


def stop_reply(ctx: AppContext, slot: str, request: gr.Request) -> None:
    """Every tab's Stop button, bound to its slot: bind(stop_reply, ctx, slot)."""
    ctx.stops.stop(session_id(request), slot)
