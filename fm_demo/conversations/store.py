"""SessionStore: every browser session's conversations, within a memory budget.

Conversations are keyed by (browser session, slot); slots let the compare tab keep two. The
store never waits on a conversation: it skips busy ones when it offloads, evicts or expires.
Handlers should ask the store for the conversation on every event (`store.conversation(...)`)
rather than keep it: that is where a conversation is re-bound to a reloaded or switched model.

The chat slot of a session attached to a browser (`attach`, when the page loads) belongs to the
browser's history (history.py): the store writes it there when each turn ends, so evicting the
session, or a restart, loses at most the reply being written; the session's next request restores
the conversation it had open from the history. One session has one conversation open at a time
(`open`, `new_conversation`); `delete` removes one from every session and from the history.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from ..metrics import ReplyMetrics
from ..models import LoadedModel, ModelManager
from ..serving.namespaces import BROWSER, derive
from ..settings import Settings
from .history import Entry, History, browser_id, new_id
from .sessions import Conversation, ConversationError, ImportRefused
from .transfer import export_bytes, peek_model, transcript_json

log = logging.getLogger("fm_demo.history")
HISTORY_SLOT = "chat"  # the slot whose conversations the history keeps


@dataclass
class Opened:
    """A session's browser, and the history row its chat slot holds (written once it has a turn)."""

    browser: str
    id: str


class SessionStore:
    """Conversations keyed by (browser session, slot); slots let the compare tab keep two.

    Memory policy, after every reply and on every lookup: states idle for offload_after_s, or
    beyond the hot_states most recent, leave the GPU (their copy waits on CPU); while all caches
    together exceed session_budget_bytes, the least recently used conversations first lose their
    older snapshots, then their whole cache (their tokens stay: the next reply rebuilds and
    reports a cache miss); conversations idle for session_ttl_s are dropped; beyond max_sessions
    the least recently used sessions are dropped.
    """

    def __init__(self, settings: Settings, manager: ModelManager, history: History | None = None):
        self.settings, self.manager = settings, manager
        self.history = history if history is not None else History.from_settings(settings)
        self._lock = threading.Lock()
        self._convs: OrderedDict[tuple[str, str], Conversation] = OrderedDict()  # LRU first
        # session -> its browser and open row; outlives the session's conversations (bounded apart)
        self._opened: OrderedDict[str, Opened] = OrderedDict()
        self._counts = dict(replies=0, cache_hits=0, cache_misses=0, rebuilt_tokens=0, evictions=0,
                            trims=0, offloads=0, expired=0, dropped_sessions=0)
        manager.on_unload(self._model_unloaded)

    def conversation(self, session_id: str, preset_key: str, precision: str | None = None,
                     slot: str = "chat", progress: Callable[[float, str], None] | None = None) -> Conversation:
        """The session's conversation in `slot`, bound to the requested model (loaded if needed).

        Raises ModelLoadError when the model cannot be loaded; the conversation is kept.
        """
        lm = self.manager.get(preset_key, precision, progress)
        key = (str(session_id), slot)
        with self._lock:
            conv = self._convs.get(key)
        if conv is None:
            conv = self._reopen(str(session_id), slot, lm)
        with self._lock:
            conv = self._convs.setdefault(key, conv)
            self._convs.move_to_end(key)
            conv.last_used = time.monotonic()
        if conv.lm is not lm:
            conv.bind(lm)
        self.maintain(active=conv)
        return conv

    def get(self, session_id: str, slot: str = "chat") -> Conversation | None:
        """The conversation if there is one, without loading anything."""
        with self._lock:
            return self._convs.get((str(session_id), slot))

    def put(self, session_id: str, conv: Conversation, slot: str = "chat") -> Conversation:
        """Register a conversation (an import or a fork) under a session and slot; in the history's
        slot of an attached session it is a new row of the browser's history, written now."""
        conv.on_commit = self._after_reply
        with self._lock:
            old = self._convs.pop((str(session_id), slot), None)
            self._convs[(str(session_id), slot)] = conv
            opened = self._opened.get(str(session_id)) if slot == HISTORY_SLOT else None
            if opened is not None:
                self._point(opened, new_id())
                conv.history_id, conv.browser = opened.id, opened.browser
        if old is not None and old is not conv:
            old.release_states()
        self.save(conv)
        self.maintain(active=conv)
        return conv

    def fork(self, session_id: str, src_slot: str, dst_slot: str) -> Conversation:
        src = self.get(session_id, src_slot)
        if src is None:
            raise ConversationError(f"no conversation in '{src_slot}' to fork")
        return self.put(session_id, src.fork(), dst_slot)

    def import_bytes(self, session_id: str, data: bytes, slot: str = "chat", preset_key: str | None = None,
                     precision: str | None = None) -> Conversation:
        """Import an exported conversation, by default on the model it was saved with."""
        saved = peek_model(data, self.settings)
        if preset_key is None:
            preset_key, precision = saved.get("preset"), precision or saved.get("precision")
            if preset_key not in self.manager.served:
                raise ImportRefused(f"this conversation was saved with '{preset_key}', which this server "
                                    f"does not serve")
        lm = self.manager.get(preset_key, precision)
        return self.put(session_id, Conversation.import_bytes(data, lm, self.settings), slot)

    def reset(self, session_id: str, slot: str | None = None) -> None:
        """Drop the session's conversations (in `slot`, or all). The history keeps what it has: a
        reset chat slot starts a new conversation, a whole reset (the page closed) forgets the
        session's browser."""
        sid = str(session_id)
        with self._lock:
            dropped = [self._convs.pop(k) for k in list(self._convs) if k[0] == sid and slot in (None, k[1])]
            if slot is None:
                self._opened.pop(sid, None)
            elif slot == HISTORY_SLOT and sid in self._opened:
                self._point(self._opened[sid], new_id())
        for c in dropped:
            c.release_states()

    # -- history -----------------------------------------------------------------------------
    def attach(self, session_id: str, browser: object) -> str:
        """Tie the session to a browser (its id, or a new one when `browser` is none this server
        hands out; returned). A chat conversation the session has that belongs to no browser yet
        becomes this one's; one of another browser leaves the session."""
        browser, sid = browser_id(browser), str(session_id)
        adopted = dropped = None
        with self._lock:
            opened = self._opened.get(sid)
            if opened is None or opened.browser != browser:
                opened = self._opened[sid] = Opened(browser, new_id())
            self._opened.move_to_end(sid)
            while len(self._opened) > 4 * self.settings.max_sessions:
                self._opened.popitem(last=False)
            conv = self._convs.get((sid, HISTORY_SLOT))
            if conv is not None and conv.browser is None:
                adopted, conv.history_id, conv.browser = conv, opened.id, browser
            elif conv is not None and conv.browser != browser:
                dropped = self._convs.pop((sid, HISTORY_SLOT))
        if adopted is not None:
            self.save(adopted)
        if dropped is not None:
            dropped.release_states()
        return browser

    def entries(self, session_id: str) -> list[Entry]:
        """The conversations of the session's browser, the one written last first."""
        opened = self._opened_of(session_id)
        return self.history.entries(opened.browser) if opened is not None else []

    def open_id(self, session_id: str) -> str | None:
        """The history row the session's chat slot holds (it may not be written yet)."""
        opened = self._opened_of(session_id)
        return opened.id if opened is not None else None

    def open(self, session_id: str, id: str, precision: str | None = None,
             progress: Callable[[float, str], None] | None = None) -> Conversation:
        """Make the browser's conversation `id` the session's chat, on the model it was saved with
        (the default one when this server no longer offers it)."""
        opened = self._require_opened(session_id)
        record = self.history.load(id, opened.browser)
        if record is None:
            raise ConversationError("that conversation is no longer in this browser's history")
        preset = record.preset if record.preset in self.manager.presets else self.settings.default_preset
        lm = self.manager.get(preset, precision or (record.precision if preset == record.preset else None),
                              progress)
        conv = self._restored(record, lm, str(session_id))
        with self._lock:
            self._point(opened, id)
            old = self._convs.pop((str(session_id), HISTORY_SLOT), None)
            self._convs[(str(session_id), HISTORY_SLOT)] = conv
        if old is not None:
            old.release_states()
        self.maintain(active=conv)
        return conv

    def reopen(self, session_id: str, precision: str | None = None) -> Conversation | None:
        """Open the conversation the session's browser had open last (its page loaded again, maybe
        on a restarted server). None: that was a new chat, not written yet, which the session
        goes on with."""
        opened = self._require_opened(session_id)
        id = self.history.open_of(opened.browser)
        if id is not None and self.history.load(id, opened.browser) is not None:
            return self.open(session_id, id, precision)
        with self._lock:
            opened.id = id or opened.id
        return None

    def new_conversation(self, session_id: str) -> None:
        """An empty chat for the session; the conversation it had stays in the history."""
        self.reset(session_id, HISTORY_SLOT)

    def rename(self, session_id: str, id: str, title: str) -> bool:
        opened = self._require_opened(session_id)
        return self.history.rename(id, opened.browser, title)

    def delete(self, session_id: str, id: str) -> bool:
        """Delete the browser's conversation `id` everywhere: the history's row, and the memory
        of every session that has it open (each gets a new, empty chat)."""
        opened = self._require_opened(session_id)
        deleted = self.history.delete(id, opened.browser)
        with self._lock:
            keys = [k for k, c in self._convs.items() if c.history_id == id and c.browser == opened.browser]
            dropped = [self._convs.pop(k) for k in keys]
            for o in self._opened.values():
                if o.id == id and o.browser == opened.browser:
                    self._point(o, new_id())
        for c in dropped:
            c.history_id = None
            c.release_states()
        return deleted or bool(dropped)

    def save(self, conv: Conversation) -> bool:
        """Write a conversation of the history (its transcript, and its state where the budget
        allows) and return whether it was written. One without a turn is no row: its row, if any,
        goes. A conversation writing a reply is skipped: that reply's end writes it."""
        lm, id, browser = conv.lm, conv.history_id, conv.browser
        if id is None or browser is None or lm is None:
            return False
        parts = conv.saved_parts()
        if parts is None:
            return False
        system, turns, state, forks = parts
        if not turns:
            self.history.delete(id, browser)
            return False
        try:
            blob = None
            if state is not None and self.history.state_budget:
                blob = export_bytes(system, turns, lm, state, forks)
            self.history.save(id, browser, turns[0].user, *lm.key, transcript_json(system, turns, forks), blob)
        except Exception as e:  # a full disk or a locked file must not cost the reply
            log.error("could not write conversation %s to the history: %s", id, e)
            return False
        return True

    def _point(self, opened: Opened, id: str) -> None:
        """The session's chat is now row `id`; its browser opens it when a page of it loads."""
        opened.id = id
        self.history.set_open(opened.browser, id)

    def _opened_of(self, session_id: str) -> Opened | None:
        with self._lock:
            return self._opened.get(str(session_id))

    def _require_opened(self, session_id: str) -> Opened:
        opened = self._opened_of(session_id)
        if opened is None:
            raise ConversationError("this page has no history yet; reload it")
        return opened

    def _reopen(self, sid: str, slot: str, lm: LoadedModel) -> Conversation:
        """The session's conversation in `slot` when memory has none: in the history's slot the row
        the session had open (evicted from memory, or written before a restart), else a new one."""
        opened = self._opened_of(sid) if slot == HISTORY_SLOT else None
        if opened is None:
            return self._new(lm, sid)
        record = self.history.load(opened.id, opened.browser)
        conv = self._restored(record, lm, sid) if record is not None else self._new(lm, sid)
        conv.history_id, conv.browser = opened.id, opened.browser
        return conv

    def _restored(self, record, lm: LoadedModel, sid: str) -> Conversation:
        conv = Conversation.restore(lm, record.transcript, record.state, self.settings,
                                    namespace=self._namespace(sid))
        conv.on_commit = self._after_reply
        conv.history_id, conv.browser = record.id, record.browser
        return conv

    def stats(self) -> dict:
        with self._lock:
            convs = list(self._convs.values())
            sessions = {k[0] for k in self._convs}
        return {"sessions": len(sessions), "conversations": len(convs),
                "cache_bytes": sum(c.cache_bytes() for c in convs),
                "device_bytes": sum(c.device_bytes() for c in convs),
                "budget_bytes": self.settings.session_budget_bytes,
                "context_tokens": sum(c.context_tokens for c in convs), **self._counts}

    # -- memory ------------------------------------------------------------------------------
    def maintain(self, active: Conversation | None = None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._expire(now, active)
            convs = list(self._convs.values())  # least recently used first
        hot = [c for c in reversed(convs) if c.device_bytes() and c is not active]
        for rank, c in enumerate(hot):
            if rank >= self.settings.hot_states or now - c.last_used > self.settings.offload_after_s:
                if c.offload():
                    self._count("offloads")
        self._fit_budget(convs, active)

    def _fit_budget(self, convs: list[Conversation], active: Conversation | None) -> None:
        total, budget = sum(c.cache_bytes() for c in convs), self.settings.session_budget_bytes
        for level, counter in ((1, "trims"), (2, "evictions")):
            for c in convs:
                if total <= budget:
                    return
                if c is not active and (freed := c.trim(level)):
                    total -= freed
                    self._count(counter)
        if total > budget and active is not None and active.trim(1):
            self._count("trims")

    def _expire(self, now: float, active: Conversation | None) -> None:
        """Drop idle conversations and the oldest sessions beyond max_sessions (lock held)."""
        ttl = self.settings.session_ttl_s
        for key, c in list(self._convs.items()):
            if now - c.last_used > ttl and not c.busy and c is not active:
                del self._convs[key]
                c.release_states()
                self._counts["expired"] += 1
        sessions = list(dict.fromkeys(k[0] for k in self._convs))  # least recently used first
        for sid in sessions[:max(0, len(sessions) - self.settings.max_sessions)]:
            if any(c is active or c.busy for k, c in self._convs.items() if k[0] == sid):
                continue
            for key in [k for k in self._convs if k[0] == sid]:
                self._convs.pop(key).release_states()
            self._counts["dropped_sessions"] += 1

    def _new(self, lm: LoadedModel, session_id: str) -> Conversation:
        """A new conversation of a browser session, in the session's namespace (derived by the
        server: a session hash is the client's to pick, so it never names a namespace itself)."""
        conv = Conversation(lm, self.settings, namespace=self._namespace(session_id))
        conv.on_commit = self._after_reply
        return conv

    def _namespace(self, session_id: str) -> str:
        return derive(BROWSER, session_id, secret=self.settings.cache_secret)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _after_reply(self, conv: Conversation, m: ReplyMetrics | None) -> None:
        self.save(conv)
        if m is not None:
            self._count("replies")
            self._count("cache_hits" if m.cache_hit else "cache_misses")
            self._count("rebuilt_tokens", m.rebuilt_tokens)
        if conv.lm is not None and not self.manager.is_loaded(conv.lm):
            conv.detach()
        self.maintain(active=conv)

    def _model_unloaded(self, lm: LoadedModel) -> None:
        with self._lock:
            convs = [c for c in self._convs.values() if c.lm is lm]
        for c in convs:
            c.detach()
