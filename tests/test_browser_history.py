"""The history sidebar in a real browser (Debian's chromium through Playwright), across a restart:
the app on a history file is closed and a new one (new models, store and history objects) serves
the same file on the same port; the page reloads and finds its conversations in the sidebar.

Saves a screenshot of the sidebar as history.png (to FM_DEMO_SCREENSHOT_DIR, as test_browser.py).
"""

from __future__ import annotations

import time

import pytest
from test_browser import (
    ARGS,
    CHROMIUM,
    WAIT_MS,
    bot_text,
    free_port,
    save_shot,
    set_number,
    toggle_sampling,
    wait_for,
)
from test_ui_handlers import tiny_context

from fm_demo.settings import Settings
from fm_demo.ui import build_demo, launch_kwargs, queue_kwargs

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium: apt-get install chromium")
FALCON, SUM, RECALL = "Remember the word falcon.", "What is 47 + 35?", "Which word did I ask you to remember?"


def serve(db: str, port: int, tmp_path_factory):
    """The app on history file `db` at `port`: a demo of its own, nothing shared with another."""
    settings = Settings(device="cpu", max_new_tokens=64, history_db=db)
    ctx = tiny_context(settings, tmp_path_factory)
    demo = build_demo(settings, ctx).queue(**queue_kwargs(settings))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            **launch_kwargs(settings))
    return demo, ctx, url


def listed(page) -> list[str]:
    return [s.strip() for s in page.locator("#history-list label").all_inner_texts()]


def open_page(page, url: str) -> None:
    """Load the page and make its replies greedy (the same every run)."""
    for attempt in range(3):  # after a restart Chromium's error page may still be landing: go again
        try:
            page.goto(url, wait_until="load")
            break
        except Exception as e:
            if "interrupted by another navigation" not in str(e) or attempt == 2:
                raise
            page.wait_for_timeout(500)
    page.wait_for_selector("#chat-input textarea", timeout=WAIT_MS)
    toggle_sampling(page)
    set_number(page, "#chat-temperature", 0)
    toggle_sampling(page)


def send(page, ctx, text: str) -> None:
    """Send `text` and wait until its reply has ended and the sidebar has caught up."""
    users = page.locator("#chatbot [data-testid='user']")
    before = users.count()
    page.fill("#chat-input textarea", text)
    page.keyboard.press("Enter")
    wait_for(lambda: users.count() == before + 1, f"{text!r} to show")

    def ended() -> bool:
        convs = [c for (sid, slot), c in ctx.store._convs.items() if slot == "chat"]
        return bool(convs) and all(not c.busy and c.turns and c.turns[-1].finish_reason for c in convs)

    wait_for(ended, f"the reply to {text!r}")
    wait_for(lambda: "streaming" not in page.inner_text("#readout"), "the readout to settle")


def test_the_sidebar_brings_the_conversations_back_after_a_restart(tmp_path, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    db, port = str(tmp_path / "history.sqlite3"), free_port()
    demo, ctx, url = serve(db, port, tmp_path_factory)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            open_page(page, url)
            wait_for(lambda: len(ctx.store._opened) == 1, "the page to tie itself to a browser id")
            browser_id = next(iter(ctx.store._opened.values())).browser
            send(page, ctx, FALCON)
            wait_for(lambda: listed(page) == [FALCON], lambda: f"the sidebar to list it: {listed(page)}")
            page.click("#history-new")
            wait_for(lambda: page.locator("#chatbot [data-testid='user']").count() == 0, "an empty chat")
            send(page, ctx, SUM)
            wait_for(lambda: listed(page) == [SUM, FALCON], lambda: f"both listed: {listed(page)}")
        finally:
            demo.close()
        with pytest.raises(Exception):  # the server is gone
            page.reload(wait_until="load", timeout=5000)

        demo, ctx, url = serve(db, port, tmp_path_factory)  # a new server on the same file and port
        try:
            open_page(page, url)  # the same address: a reload
            wait_for(lambda: listed(page) == [SUM, FALCON],
                     lambda: f"the sidebar after the restart: {listed(page)}")
            assert next(iter(ctx.store._opened.values())).browser == browser_id  # read back from localStorage
            wait_for(lambda: "82" in bot_text(page), "the latest conversation to open by itself")
            page.locator("#history-list").get_by_text(FALCON, exact=True).click()
            wait_for(lambda: "falcon" in bot_text(page), "the first conversation to open")
            send(page, ctx, RECALL)
            wait_for(lambda: bot_text(page) == "You asked me to remember the word falcon.",
                     lambda: f"the recall through the restored conversation: {bot_text(page)!r}")
            wait_for(lambda: listed(page) == [FALCON, SUM],
                     lambda: f"written last, listed first: {listed(page)}")

            page.fill("#history-title textarea, #history-title input", "The falcon")
            page.click("#history-rename")
            wait_for(lambda: listed(page) == ["The falcon", SUM], lambda: f"the rename: {listed(page)}")
            time.sleep(1)
            save_shot(page, "history.png")  # two conversations, the renamed one open
            page.locator("#history-list").get_by_text(SUM, exact=True).click()
            wait_for(lambda: "82" in bot_text(page), "the sum conversation to open")
            page.click("#history-delete")
            wait_for(lambda: listed(page) == ["The falcon"], lambda: f"the deletion: {listed(page)}")
            wait_for(lambda: page.locator("#chatbot [data-testid='user']").count() == 0, "the chat to empty")
            assert [e.title for e in ctx.store.history.entries(browser_id)] == ["The falcon"]
            page.locator("#history-list").get_by_text("The falcon", exact=True).click()
            wait_for(lambda: page.locator("#chatbot [data-testid='user']").count() == 2, "it to open again")
        finally:
            browser.close()
            demo.close()
