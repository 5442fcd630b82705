"""SessionStore: every browser session's conversations, within a memory budget.

Conversations are keyed by (browser session, slot); slots let the compare tab keep two. The
store never waits on a conversation: it skips busy ones when it offloads, evicts or expires.
Handlers should ask the store for the conversation on every event (`store.conversation(...)`)
rather than keep it: that is where a conversation is re-bound to a reloaded or switched model.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable

from ..metrics import ReplyMetrics
from ..models import LoadedModel, ModelManager
from ..settings import Settings
from .sessions import Conversation, ConversationError, ImportRefused
from .transfer import peek_model


class SessionStore:
    """Conversations keyed by (browser session, slot); slots let the compare tab keep two.

    Memory policy, after every reply and on every lookup: states idle for offload_after_s, or
    beyond the hot_states most recent, leave the GPU (their copy waits on CPU); while all caches
    together exceed session_budget_bytes, the least recently used conversations first lose their
    older snapshots, then their whole cache (their tokens stay: the next reply rebuilds and
    reports a cache miss); conversations idle for session_ttl_s are dropped; beyond max_sessions
    the least recently used sessions are dropped.
    """

    def __init__(self, settings: Settings, manager: ModelManager):
        self.settings, self.manager = settings, manager
        self._lock = threading.Lock()
        self._convs: OrderedDict[tuple[str, str], Conversation] = OrderedDict()  # LRU first
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
                conv = self._convs[key] = self._new(lm, str(session_id))
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
        """Register a conversation (an import or a fork) under a session and slot."""
        conv.on_commit = self._after_reply
        with self._lock:
            self._convs[(str(session_id), slot)] = conv
            self._convs.move_to_end((str(session_id), slot))
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
        saved = peek_model(data)
        if preset_key is None:
            preset_key, precision = saved.get("preset"), precision or saved.get("precision")
            if preset_key not in self.manager.served:
                raise ImportRefused(f"this conversation was saved with '{preset_key}', which this server "
                                    f"does not serve")
        lm = self.manager.get(preset_key, precision)
        return self.put(session_id, Conversation.import_bytes(data, lm, self.settings), slot)

    def reset(self, session_id: str, slot: str | None = None) -> None:
        with self._lock:
            dropped = [self._convs.pop(k) for k in list(self._convs) if k[0] == str(session_id) and slot in (None, k[1])]
        for c in dropped:
            c.release_states()

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
        conv = Conversation(lm, self.settings, namespace=session_id)
        conv.on_commit = self._after_reply
        return conv

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _after_reply(self, conv: Conversation, m: ReplyMetrics | None) -> None:
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
