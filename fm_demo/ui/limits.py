"""Fair share of the server: how many events one client may have at once, and the lab's queue.

A client is a browser session (Gradio's session hash) and, with `by_address`, across sessions an
address (the peer's, which uvicorn takes from X-Forwarded-For when the peer is a proxy it trusts:
FORWARDED_ALLOW_IPS; behind a proxy it does not trust, every visitor has the proxy's address, so
addresses are counted only where the operator says they mean something). Each may have at most
`max_events` events running or waiting: the chat, compare, long-context and lab events, the /chat
and /compare API, and (by address) /v1 completions, counted together. One more is refused at once
with a busy message instead of waiting in Gradio's queue, which is shared by everyone
(queue_max_size).

Gradio events are checked by a validator, which Gradio runs when the event asks to join the queue,
before it is queued; the events counted are the ones Gradio's queue holds right now (waiting or
running) whose handler has not ended (`limited` marks that), so an event that ends or fails stops
counting when its handler does, and one cancelled or whose client left when Gradio lets go of it.
An event let in counts from its validator on: until Gradio has queued it (moments later) it is
held as "joining", so two events of one client that ask to join at the same instant are checked
one after the other and never both take the last place. /v1 requests never pass Gradio's queue:
each holds a Ticket from `enter` until its response ends, checked and counted under the same lock.

The lab (a measurement of up to 2 x lab_max_seconds on the serving device) runs one at a time
(its events share the concurrency id LAB), one per client, and at most `lab_max_waiting` wait.
"""

from __future__ import annotations

import collections
import functools
import inspect
import threading
import time
from typing import Any, Callable, Iterable

import gradio as gr

LAB = "lab"  # concurrency id of the lab's events: one measurement at a time on the device
LIMITED = "_fm_limited"  # attribute on a handler whose events count towards a client's limit
ENDED = "fm_demo.ended"  # key in the ASGI scope of an event's HTTP request once its handler ended
JOINING_S = 10.0  # an event let in that Gradio has not queued by then never will be (its join failed)


class ClientBusy(RuntimeError):
    """A client already has as many events as it may; the message is for the user."""


class ClientLimits:
    """Counts a client's events (Gradio's queue and /v1 tickets) and refuses one too many."""

    def __init__(self, max_events: int, lab_max_waiting: int, by_address: bool = False):
        self.max_events, self.lab_max_waiting, self.by_address = max_events, lab_max_waiting, by_address
        self._lock = threading.RLock()
        self._api: collections.Counter[str] = collections.Counter()  # address -> /v1 requests running
        self._queue: Callable[[], Iterable[Any]] = lambda: ()  # Gradio's events, once the app is built
        # events let in and not yet in Gradio's queue: id(HTTP request) -> (request, session, address,
        # concurrency id, when); the request is kept so that its id is not reused meanwhile
        self._joining: dict[int, tuple[object, str | None, str, str | None, float]] = {}

    def watch(self, demo: gr.Blocks) -> None:
        """Count the events of `demo`'s queue (build_demo calls this)."""
        self._queue = lambda: list(demo._queue.event_ids_to_events.values())

    # -- counting --------------------------------------------------------------------------------
    def _queued(self) -> list[tuple[str | None, str, str | None]]:
        """(session, address, concurrency id) of every counted event in Gradio's queue or joining it."""
        out, queued = [], set()
        for event in self._queue():
            queued.add(id(event.request))
            if getattr(event.fn.fn, LIMITED, False) and not _ended(event):
                client = getattr(event.request, "client", None)
                out.append((event.session_hash, client.host if client else "", event.fn.concurrency_id))
        now = time.monotonic()
        with self._lock:
            for key, (http, session, address, cid, since) in list(self._joining.items()):
                # queued now (counted above), already over, or never to be queued
                if key in queued or _request_ended(http) or now - since > JOINING_S:
                    del self._joining[key]
                else:
                    out.append((session, address, cid))
        return out

    def admit(self, request: gr.Request | None, lab: bool = False) -> str | None:
        """A Gradio event asking to join the queue: why it may not (None: it is let in, and counts
        as joining until Gradio has queued it). The check and the count are taken together."""
        session = getattr(request, "session_hash", None)
        http = getattr(request, "request", None)  # the HTTP request Gradio's queued event keeps
        client = getattr(http, "client", None)
        address = client.host if client else ""
        with self._lock:
            why = self.refusal(session, address, lab)
            if why is None and http is not None:
                self._joining[id(http)] = (http, session, address, LAB if lab else None, time.monotonic())
        return why

    def refusal(self, session: str | None, address: str, lab: bool = False) -> str | None:
        """Why one more event of this client may not start now (None: it may)."""
        queued = self._queued()
        if not self.by_address:
            address = "\x00not counted"  # matches no event
        if lab:
            mine = [q for q in queued if q[2] == LAB and (q[0] == session or q[1] == address)]
            if mine:
                return ("You already have a lab run waiting or running; the lab runs one measurement at a "
                        "time. Wait for it to finish (or press Stop) before starting another.")
            if sum(q[2] == LAB for q in queued) > self.lab_max_waiting:
                return "The lab is busy with other visitors' runs; try again in a few minutes."
        if not self.max_events:
            return None
        with self._lock:
            api = self._api[address]
        by_session = sum(q[0] == session for q in queued) if session else 0
        by_address = sum(q[1] == address for q in queued) + api
        if max(by_session, by_address) >= self.max_events:
            return (f"You have {max(by_session, by_address)} requests running or waiting, the most one visitor "
                    f"may have at once on this server. Wait for one to finish, then try again.")
        return None

    # -- /v1 -------------------------------------------------------------------------------------
    def enter(self, address: str) -> Ticket:
        """Count one /v1 request of `address` until the ticket is closed; ClientBusy if over.
        Without by_address, nothing is counted (a /v1 request has no session)."""
        if not self.by_address:
            return Ticket(self, None)
        with self._lock:  # the check and the count together: two requests never both take the last place
            why = self.refusal(None, address)
            if why is not None:
                raise ClientBusy(why)
            self._api[address] += 1
        return Ticket(self, address)

    def _leave(self, address: str) -> None:
        with self._lock:
            self._api[address] -= 1
            if self._api[address] <= 0:
                del self._api[address]


class Ticket:
    """A /v1 request counted against its address; close() (idempotent) stops counting it."""

    def __init__(self, limits: ClientLimits, address: str | None):
        self._limits, self._address, self._open = limits, address, address is not None

    def close(self) -> None:
        if self._open:
            self._open = False
            self._limits._leave(self._address)


def limited(fn: Callable) -> Callable:
    """A handler whose events count towards its client's limit: `fn`, marking its event's HTTP
    request as ended when it returns, raises or is closed. Gradio sends the event's answer before
    it lets go of the event, so a client that asks again at once is not refused for the event it
    was just answered (an event whose handler never ran stops counting when Gradio drops it)."""
    if getattr(fn, LIMITED, False):
        return fn
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            finally:
                _end(args, kwargs)
    else:

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                _end(args, kwargs)

    setattr(counted, LIMITED, True)
    return counted


def _end(args: tuple, kwargs: dict) -> None:
    request = next((a for a in (*args, *kwargs.values()) if isinstance(a, gr.Request)), None)
    scope = getattr(getattr(request, "request", None), "scope", None)
    if isinstance(scope, dict):
        scope[ENDED] = True


def _ended(event: Any) -> bool:
    """Whether the handler of a Gradio event has ended (limited's mark on its HTTP request)."""
    return _request_ended(event.request)


def _request_ended(http: Any) -> bool:
    scope = getattr(http, "scope", None)
    return isinstance(scope, dict) and scope.get(ENDED, False)


def admission(limits: ClientLimits, fn: Callable, lab: bool = False) -> Callable:
    """A Gradio validator for `fn`'s event: refuses it before it is queued when its client is at
    its limit (or, for the lab, has a run already), with the message shown on the first input.

    Gradio calls a validator with the event's inputs and injects gr.Request by annotation, as for
    the handler: this one takes `fn`'s signature (gr.Progress left out) and reads only the request."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if not isinstance(p.default, gr.Progress)]
    n_inputs = sum(not _is_request(p) and not _is_event_data(p) for p in params)

    def validate(*args, **kwargs):
        request = next((a for a in (*args, *kwargs.values()) if isinstance(a, gr.Request)), None)
        why = limits.admit(request, lab)
        if why is not None and not n_inputs:  # no input to show it on: the join fails with it
            raise gr.Error(why)
        return [gr.validate(why is None or i > 0, (why or "") if i == 0 else "") for i in range(n_inputs)]

    validate.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    validate.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not p.empty}
    return validate


def _is_event_data(p: inspect.Parameter) -> bool:
    """A parameter Gradio fills with the event's data (gr.EventData, gr.SelectData...), no input."""
    a = p.annotation
    return (isinstance(a, type) and issubclass(a, gr.EventData)) or a in ("gr.EventData", "EventData")


def _is_request(p: inspect.Parameter) -> bool:
    return p.annotation is gr.Request or p.annotation in ("gr.Request", "Request")
