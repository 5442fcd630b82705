"""A real server killed mid-conversation: `python app.py` on a port with FM_DEMO_HISTORY_DB set
gets SIGKILL between two turns, starts again on the same file, and the same browser id (through
gradio_client, as the page sends it) continues the conversation with the greedy reply an
uninterrupted server gives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ("Remember the word falcon.", "What is 47 + 35?", "Which word did I ask you to remember?")
N = 48  # new tokens per reply


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python app.py` in a process group of its own, on `db` and `port`."""

    def __init__(self, db: Path, port: int, log: Path, state_bytes: int | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FM_DEMO_", "GRADIO_"))}
        env.update(FM_DEMO_HISTORY_DB=str(db), FM_DEMO_HOST="127.0.0.1", FM_DEMO_PORT=str(port),
                   FM_DEMO_DEVICE="cpu", FM_DEMO_MAX_NEW_TOKENS=str(N), HF_HUB_OFFLINE="1",
                   GRADIO_ANALYTICS_ENABLED="False")
        if state_bytes is not None:
            env["FM_DEMO_HISTORY_STATE_BYTES"] = str(state_bytes)
        self.url, self.log = f"http://127.0.0.1:{port}/", log
        self._out = open(log, "a")
        self.proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def client(self, timeout: float = 120.0):
        from gradio_client import Client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"app.py exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                return Client(self.url, verbose=False)
            except Exception:
                time.sleep(0.5)
        pytest.fail(f"app.py did not answer within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or closed."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)
        self._out.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        self._out.close()


def open_page(client, browser: str) -> tuple[str, list[tuple[str, str]]]:
    """What the page does when it loads: send its browser id ("" when it has none); returns the
    id the server settled on and the chat it shows, as (role, text) pairs."""
    out = client.predict(browser, api_name="/history_load")
    chat = next(v for v in out if isinstance(v, list))
    return out[0], [(m["role"], "".join(part["text"] for part in m["content"])) for m in chat]


def say(client, text: str) -> str:
    return client.predict(text, api_name="/chat")  # greedy: temperature 0 is /chat's default


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[str]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    server = Server(tmp / "history.sqlite3", free_port(), tmp / "app.log")
    try:
        client = server.client()
        open_page(client, "")
        return [say(client, q) for q in QUESTIONS]
    finally:
        server.stop()


@pytest.mark.parametrize("state_bytes", [None, 0], ids=["states kept", "transcripts only"])
def test_a_killed_server_restarts_on_its_history_and_the_conversation_goes_on_unchanged(
        tmp_path, uninterrupted, state_bytes):
    db, port, log = tmp_path / "history.sqlite3", free_port(), tmp_path / "app.log"
    server = Server(db, port, log, state_bytes)
    try:
        client = server.client()
        browser, chat = open_page(client, "")
        assert chat == [] and len(browser) >= 43
        replies = [say(client, q) for q in QUESTIONS[:2]]
        assert replies == uninterrupted[:2]
        context = client.predict(api_name="/stats")["context_tokens"]
    finally:
        server.kill()
    assert "Traceback" not in log.read_text()

    server = Server(db, port, log, state_bytes)  # the same file, the same port
    try:
        client = server.client()
        assert open_page(client, browser) == (browser, [
            ("user", QUESTIONS[0]), ("assistant", uninterrupted[0]),
            ("user", QUESTIONS[1]), ("assistant", uninterrupted[1]),
        ])
        assert say(client, QUESTIONS[2]) == uninterrupted[2]
        last = client.predict(api_name="/stats")["last_reply"]
        if state_bytes is None:  # resumed from the state written before the kill
            assert last["reused_tokens"] == context
        else:  # the transcript read again by chunked prefill, and the reply says so
            assert last["reused_tokens"] == 0 and last["prefilled_tokens"] > context
            assert last["rebuilt_tokens"] == context and not last["cache_hit"]
        stranger, chat = open_page(client, "")  # a browser without an id gets a new one, and nothing
        assert stranger != browser and chat == []
    finally:
        server.stop()
