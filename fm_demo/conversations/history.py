"""The chat history: every browser's conversations in one SQLite file (stdlib sqlite3), so they
outlive the server process, a Space rebuild (on persistent storage) and the session store's LRU.

One row a conversation: the browser it belongs to (a random id the page keeps in localStorage,
see browser_id), its title, model, the transcript (transfer.transcript_json: the system prompt and
each turn's text and token ids) and, where it fits the budget, the state at its end as an export
file (transfer.export_bytes), so it resumes without reading its transcript again. The store writes
a row when a turn ends, never per token. The states together stay within `state_budget` bytes: the
rows written longest ago lose theirs first (never their transcript), and are read again by chunked
prefill at their next reply. A second table remembers which conversation each browser has open
(its page opens that one again when it loads).

One connection, shared by every thread and serialised by a lock; the file is in WAL mode (a crash
leaves the last committed rows; a reader such as a backup never blocks a write). An empty path
keeps the same table in memory: the sidebar works, nothing outlives the process, and no states are
kept (the prefix cache holds them while the server runs).
"""

from __future__ import annotations

import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
TITLE_CHARS = 60
BROWSER_ID = re.compile(r"[A-Za-z0-9_-]{32,128}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    browser TEXT NOT NULL,
    title TEXT NOT NULL,
    preset TEXT NOT NULL,
    precision TEXT NOT NULL,
    transcript TEXT NOT NULL,
    state BLOB,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_browser ON conversations (browser, updated);
CREATE TABLE IF NOT EXISTS browsers (browser TEXT PRIMARY KEY, open TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def browser_id(value: object) -> str:
    """The browser's id: `value` when it is one this server hands out (32 to 128 URL-safe
    characters), else a new one. It only has to be unguessable: it is no password, and whoever
    holds it sees that browser's conversations."""
    if isinstance(value, str) and BROWSER_ID.fullmatch(value):
        return value
    return secrets.token_urlsafe(32)


def new_id() -> str:
    """A conversation's id (a row's key; never shown as a secret)."""
    return secrets.token_urlsafe(12)


def title_of(text: str) -> str:
    """A title from a message: its words on one line, cut to TITLE_CHARS."""
    words = " ".join(str(text).split())
    return words if len(words) <= TITLE_CHARS else words[:TITLE_CHARS - 1].rstrip() + "…"


@dataclass(frozen=True)
class Entry:
    """A row as the sidebar lists it."""

    id: str
    title: str
    updated: float


@dataclass(frozen=True)
class Record:
    """A whole row: what restores a conversation (Conversation.restore)."""

    id: str
    browser: str
    title: str
    preset: str
    precision: str
    transcript: str
    state: bytes | None
    updated: float


class History:
    def __init__(self, path: str = "", state_budget: int = 0):
        self.path = path
        self.state_budget = state_budget if path else 0  # in memory: transcripts only
        if path:
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(Path(path).expanduser()) if path else ":memory:",
                                   check_same_thread=False, isolation_level=None, timeout=30)
        with self._lock:
            if path:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @classmethod
    def from_settings(cls, settings) -> History:
        return cls(settings.history_db.strip(), settings.history_state_bytes)

    @property
    def persistent(self) -> bool:
        return bool(self.path)

    def journal_mode(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    def secret(self) -> str:
        """The key the page's BrowserState encrypts its localStorage with: kept in the file, so the
        page still reads its browser id after a restart (Gradio's default is new every start)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'browser_secret'").fetchone()
            if row is None:
                row = (secrets.token_urlsafe(24),)
                self._db.execute("INSERT INTO meta VALUES ('browser_secret', ?)", row)
            return row[0]

    # -- rows ----------------------------------------------------------------------------------
    def save(self, id: str, browser: str, title: str, preset: str, precision: str, transcript: str,
             state: bytes | None = None) -> bool:
        """Write a conversation (a new row takes `title`; an existing one keeps its own, which a
        rename may have set); it becomes the one its browser has open (set_open). `state` is kept
        when it fits the budget, and the states of the rows written longest ago are dropped until
        all fit. Returns whether the state was kept."""
        keep = state is not None and len(state) <= self.state_budget
        now = time.time()
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "preset = excluded.preset, precision = excluded.precision, transcript = excluded.transcript, "
                "state = excluded.state, updated = excluded.updated WHERE browser = excluded.browser",
                (id, browser, title_of(title), preset, precision, transcript, state if keep else None, now,
                 now))
            self._db.execute("INSERT INTO browsers VALUES (?, ?, ?) ON CONFLICT (browser) DO UPDATE SET "
                             "open = excluded.open, updated = excluded.updated", (browser, id, now))
            if keep:
                self._fit_states()
        return keep

    def _fit_states(self) -> None:
        """Drop the states of the rows written longest ago until the rest fit the budget (lock held)."""
        rows = self._db.execute("SELECT id, length(state) FROM conversations WHERE state IS NOT NULL "
                                "ORDER BY updated DESC").fetchall()
        total, drop = 0, []
        for id, size in rows:
            total += size
            if total > self.state_budget:
                drop.append((id,))
        self._db.executemany("UPDATE conversations SET state = NULL WHERE id = ?", drop)

    def entries(self, browser: str) -> list[Entry]:
        """The browser's conversations, the one written last first."""
        with self._lock:
            rows = self._db.execute("SELECT id, title, updated FROM conversations WHERE browser = ? "
                                    "ORDER BY updated DESC", (browser,)).fetchall()
        return [Entry(*row) for row in rows]

    def load(self, id: str, browser: str) -> Record | None:
        """The row `id` if it belongs to `browser`."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, browser, title, preset, precision, transcript, state, updated FROM conversations "
                "WHERE id = ? AND browser = ?", (id, browser)).fetchone()
        return None if row is None else Record(*row)

    def rename(self, id: str, browser: str, title: str) -> bool:
        """Give the browser's row `id` a title; False when there is no such row or the title is empty."""
        title = title_of(title)
        if not title:
            return False
        with self._lock:
            cur = self._db.execute("UPDATE conversations SET title = ? WHERE id = ? AND browser = ?",
                                   (title, id, browser))
        return cur.rowcount == 1

    def delete(self, id: str, browser: str) -> bool:
        """Remove the browser's row `id`, its transcript and state; False when there was none."""
        with self._lock:
            cur = self._db.execute("DELETE FROM conversations WHERE id = ? AND browser = ?", (id, browser))
        return cur.rowcount == 1

    def set_open(self, browser: str, id: str) -> None:
        """Remember the conversation the browser has open (a row, or a new chat's id not written
        yet), so that its page opens it again when it loads: the one it opened, started or wrote
        last, in any of its pages."""
        with self._lock:
            self._db.execute("INSERT INTO browsers VALUES (?, ?, ?) ON CONFLICT (browser) DO UPDATE SET "
                             "open = excluded.open, updated = excluded.updated", (browser, id, time.time()))

    def open_of(self, browser: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT open FROM browsers WHERE browser = ?", (browser,)).fetchone()
        return row[0] if row else None

    def state_bytes(self) -> int:
        with self._lock:
            return self._db.execute("SELECT coalesce(sum(length(state)), 0) FROM conversations").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
