"""Exploring a conversation in a real browser (Chromium through Playwright, the real server, the
bundled tiny models): versions of a reply with ‹ k/n › arrows, Show 3 replies, the token view and a
rewind to a chosen token, a new chat and a compare from a reply, the same by tap on a phone, and
an axe-core audit with all of it on screen.

Saves the README's screenshots (branches.png, many.png, tokens.png, compare-from-here.png,
phone-explore.png) to a temporary folder, or to FM_DEMO_SCREENSHOT_DIR (=docs refreshes them).
"""

from __future__ import annotations

import math

import pytest
from test_accessibility import AUDIT_JS, axe_script
from test_browser import (CHROMIUM, app, page, phone_page, save_shot, set_number, toggle_sampling,  # noqa: F401
                          wait_for)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install chromium")
MAX_NEW = 48


def chat_convs(ctx) -> list:
    return [c for (sid, s), c in ctx.store._convs.items() if s == "chat"]


def the_chat(ctx):
    """The conversation the page shows (the most recently used chat: one page per test here)."""
    return max(chat_convs(ctx), key=lambda c: c.last_used)


def settled(page, ctx, check=lambda conv: True, what: str = "the chat to settle", conv=None) -> None:
    """Until the chat (`conv`, else the one used last) is idle, its readout is not streaming and
    `check(conv)` holds."""
    given = conv

    def ok() -> bool:
        if given is None and not chat_convs(ctx):
            return False
        conv = given if given is not None else the_chat(ctx)
        if conv.busy or not check(conv):
            return False
        turns = list(conv.turns)  # one look: a reply may begin between two
        return (bool(turns) and turns[-1].finish_reason is not None and not conv.busy and check(conv)
                and len(conv.turns) == len(turns) and "streaming" not in page.inner_text("#readout"))

    wait_for(ok, what)


def send(page, ctx, text: str, turns: int) -> None:
    page.fill("#chat-input textarea", text)
    page.keyboard.press("Enter")
    settled(page, ctx, lambda c: len(c.turns) == turns, f"reply {turns}")


def nav(page, index: int = 0) -> str:
    """The version counter (k/n) beside reply `index`, '' when it has none."""
    counters = page.locator("#chatbot .fm-branch-count")
    return counters.nth(index).inner_text() if counters.count() > index else ""


def start(page, ctx) -> None:
    """An empty chat, greedy, short replies, one reply per message."""
    page.click("#chat-clear")
    wait_for(lambda: page.locator("#chatbot [data-testid='bot']").count() == 0, "an empty chat")
    if page.locator("#chat-max-new").is_hidden():
        toggle_sampling(page)
    set_number(page, "#chat-max-new", MAX_NEW)
    set_number(page, "#chat-temperature", 0)
    set_number(page, "#chat-top-p", 1)
    page.locator("#chat-replies").get_by_text("1", exact=True).click()


def test_retry_twice_then_back_to_the_first_reply_reads_nothing(page, app):
    ctx = app[1]
    start(page, ctx)
    send(page, ctx, "What is 47 + 35?", 1)
    first = the_chat(ctx).turns[0].reply
    set_number(page, "#chat-temperature", 2.5)
    for n in (2, 3):
        page.click("#chat-retry")
        settled(page, ctx, lambda c, n=n: c.branch_points() == {0: (n, n)}, f"version {n}")
    wait_for(lambda: nav(page) == "3/3", lambda: f"the arrows to say 3/3, not {nav(page)!r}")
    for k in (2, 1):
        page.click("#chatbot .fm-branch-prev")
        wait_for(lambda k=k: nav(page) == f"{k}/3", lambda: f"the arrows to say {k}/3, not {nav(page)!r}")
    wait_for(lambda: "version 1 of 3 shown" in page.inner_text("#readout"), "the switch's readout")
    readout = page.inner_text("#readout")
    assert "0 tokens read" in readout and "cache hit" in readout, readout
    assert page.locator("#chatbot [data-testid='bot']").last.inner_text().strip() == first.strip()
    assert the_chat(ctx).branch_points() == {0: (1, 3)}
    assert page.locator("#chatbot .fm-branch-prev").is_disabled()
    save_shot(page, "branches.png")


def test_show_3_replies_from_one_read_and_continue_from_the_second(page, app):
    ctx = app[1]
    start(page, ctx)
    set_number(page, "#chat-temperature", 2.5)
    page.locator("#chat-replies").get_by_text("3", exact=True).click()
    runner = ctx.manager.get("tiny-instruct").runner
    read_before = runner.stats()["prefill_tokens"]
    send(page, ctx, "Write a poem about the sea.", 1)
    columns = page.locator("#chat-many .fm-many-col")
    wait_for(lambda: columns.count() == 3 and page.locator("#chat-many button").count() == 3, "3 replies side by side")
    conv = the_chat(ctx)
    prompt = len(conv.turns[0].prompt_ids)
    assert runner.stats()["prefill_tokens"] - read_before == prompt  # one read of the prompt for all 3
    readout = page.inner_text("#readout")
    assert "Replies from one read" in readout and "3 replies" in readout and f"{prompt} tokens read" in readout
    texts = [columns.nth(k).locator(".fm-many-text").inner_text() for k in range(3)]
    second = list(conv.forks[0].branches[1].turns[0].reply_ids)
    assert texts[1].strip() == conv.forks[0].branches[1].turns[0].reply.strip()
    save_shot(page, "many.png")
    page.click("#chat-many button[data-version='1']")
    wait_for(lambda: nav(page) == "2/3", lambda: f"the arrows to say 2/3, not {nav(page)!r}")
    assert conv.turns[0].reply_ids == second and "0 tokens read" in page.inner_text("#readout")
    page.locator("#chat-replies").get_by_text("1", exact=True).click()
    set_number(page, "#chat-temperature", 0)
    send(page, ctx, "What can you do?", 2)
    assert conv.turns[0].reply_ids == second  # the next turn continued from the picked reply
    m = conv.last_metrics
    assert m.prefilled_tokens == len(conv.turns[1].prompt_ids) and m.reused_tokens > prompt


def test_token_view_sums_to_one_and_an_alternative_continues_from_it(page, app):
    ctx = app[1]
    start(page, ctx)
    # with no word to recall, the model guesses one: the token view shows how unsure it is
    send(page, ctx, "Which word did I ask you to remember?", 1)
    conv = the_chat(ctx)
    old = list(conv.turns[0].reply_ids)
    page.click("#chat-token-toggle input")
    tokens = page.locator("#chat-token-view .fm-tok")
    wait_for(lambda: tokens.count() == len(old), lambda: f"{len(old)} tokens in the view, not {tokens.count()}")
    shares = [float(p) for p in tokens.evaluate_all("es => es.map(e => e.dataset.p)")]
    k = min(range(len(shares)), key=shares.__getitem__)  # the least sure token
    assert shares[k] < 0.5, shares
    assert "hsl(0 " in tokens.nth(k).get_attribute("style") or shares[k] > 0.05  # red for the least likely
    tokens.nth(k).hover()
    pop = tokens.nth(k).locator(".fm-pop")
    wait_for(pop.is_visible, "the alternatives to show on hover")
    rows = [float(p) for p in pop.locator("[data-p]").evaluate_all("es => es.map(e => e.dataset.p)")]
    assert len(rows) >= 6 and math.isclose(sum(rows), 1.0, abs_tol=1e-4), rows  # top 5 (+ chosen) and the rest
    printed = [t for t in pop.locator("span:last-child").all_inner_texts() if t.endswith("%")]
    shown = [0.0 if t.startswith("<") else float(t.rstrip("%")) for t in printed]
    assert abs(sum(shown) - 100) <= 0.05 * len(shown) + 0.1 * printed.count("<0.1%"), printed  # within rounding
    save_shot(page, "tokens.png")
    choice = pop.locator("button[data-action='rewind']").first
    alt = int(choice.get_attribute("data-token"))
    choice.click()
    settled(page, ctx, lambda c: c.branch_points() == {0: (2, 2)}, "the rewound version")
    assert conv.turns[0].reply_ids[:k + 1] == old[:k] + [alt]
    wait_for(lambda: f"{k + 2} tokens read" in page.inner_text("#readout"), "the rewind's readout")
    wait_for(lambda: nav(page) == "2/2", "the arrows to say 2/2")
    page.click("#chatbot .fm-branch-prev")
    wait_for(lambda: conv.turns[0].reply_ids == old, "the first version back")


def test_branch_into_a_new_chat_and_compare_from_a_reply(page, app):
    ctx = app[1]
    start(page, ctx)
    send(page, ctx, "Remember the word falcon.", 1)
    send(page, ctx, "What is 47 + 35?", 2)
    old = the_chat(ctx)
    page.locator("#chatbot .fm-branch-new").first.click()
    wait_for(lambda: page.locator("#chatbot [data-testid='bot']").count() == 1, "a new chat with one reply")
    wait_for(lambda: the_chat(ctx) is not old and len(the_chat(ctx).turns) == 1, "the new chat")
    wait_for(lambda: page.locator("#history-list label").count() >= 2, "the new chat in the history")
    send(page, ctx, "Which word did I ask you to remember?", 2)
    new = the_chat(ctx)
    assert new.last_metrics.prefilled_tokens == len(new.turns[1].prompt_ids) and new.last_metrics.cache_hit
    assert len(old.turns) == 2  # the chat it came from is untouched
    page.locator("#chatbot .fm-branch-compare").first.click()
    wait_for(lambda: page.locator("#compare-left [data-testid='user']").count() == 1, "compare's left pane")
    assert page.locator("#compare-right [data-testid='user']").count() == 1
    assert "reads only itself" in page.inner_text("#compare-left-readout")
    save_shot(page, "compare-from-here.png")
    page.get_by_role("tab", name="Chat").click()


def test_axe_finds_nothing_serious_with_the_exploring_controls_on_screen(page, app):
    ctx = app[1]
    start(page, ctx)
    send(page, ctx, "What is 47 + 35?", 1)
    set_number(page, "#chat-temperature", 2.5)
    page.click("#chat-retry")
    settled(page, ctx, lambda c: c.branch_points() == {0: (2, 2)}, "version 2")
    if not page.locator("#chat-token-toggle input").is_checked():
        page.click("#chat-token-toggle input")
    wait_for(lambda: page.locator("#chat-token-view .fm-tok").count() > 0, "the token view")
    wait_for(lambda: nav(page) == "2/2", "the arrows")
    page.add_script_tag(path=str(axe_script()))
    violations = page.evaluate(AUDIT_JS)
    assert not violations, violations
    page.click("#chat-token-toggle input")


def test_on_a_phone_arrows_and_token_view_work_by_tap_without_side_scrolling(page, app):
    ctx = app[1]
    desk = {sid for sid, _ in ctx.store._convs}  # the sessions before the phone's page

    def phone_chat():
        return next((c for (sid, slot), c in ctx.store._convs.items() if slot == "chat" and sid not in desk), None)

    opened = set(ctx.store._opened)
    with phone_page(page, app[0]) as phone:
        # the page's load event (the history) empties the message box: type once it has run
        wait_for(lambda: set(ctx.store._opened) - opened, "the phone page's load event")
        phone.wait_for_timeout(1000)
        phone.fill("#chat-input textarea", "What is 47 + 35?")
        phone.tap("#chat-send")
        wait_for(lambda: phone_chat() is not None and len(phone_chat().turns) == 1,
                 lambda: f"the phone's conversation: {[(k, len(c.turns)) for k, c in ctx.store._convs.items()]}, "
                         f"desk {desk}, page: {phone.inner_text('#chatbot')[:200]!r}")
        conv = phone_chat()
        settled(phone, ctx, lambda c: len(c.turns) == 1, "the phone's reply", conv)
        phone.tap("#chat-retry")
        settled(phone, ctx, lambda c: c.branch_points() == {0: (2, 2)}, "the phone's retry", conv)
        wait_for(lambda: nav(phone) == "2/2", "the arrows on the phone")
        phone.tap("#chatbot .fm-branch-prev")
        wait_for(lambda: nav(phone) == "1/2", "the tapped arrow to switch")
        wait_for(lambda: "0 tokens read" in phone.inner_text("#readout"), "the switch's readout on the phone")
        phone.tap("#chat-token-toggle input")
        tokens = phone.locator("#chat-token-view .fm-tok")
        wait_for(lambda: tokens.count() == len(conv.turns[0].reply_ids), "the phone's token view")
        tokens.nth(1).tap()
        wait_for(tokens.nth(1).locator(".fm-pop").is_visible, "the alternatives on tap")
        widths = phone.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert widths[0] <= widths[1] == 390, widths  # no horizontal scrolling
        for sel in ("#chat-actions", "#chat-explore", "#chatbot .fm-branch", "#chat-token-view"):
            box = phone.locator(sel).first.bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390, (sel, box)
        phone.evaluate("() => document.querySelector('#chatbot').scrollIntoView()")
        save_shot(phone, "phone-explore.png", width=390, full_page=False)
