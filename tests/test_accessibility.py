"""An axe-core audit (WCAG 2 A and AA rules) of every tab after one chat turn, in Chromium.

axe-core's own script (axe.min.js from npm, as packaged by axe-playwright-python) is injected
into the page; the test fails on any serious or critical violation. The app's theme and its
workarounds for Gradio's components (fm_demo/ui/theme.py) bring the count from 74 to 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_browser import CHROMIUM, WAIT_MS, app, page, wait_reply  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install chromium")

AUDIT_JS = """async () => {
    const r = await axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa']}});
    return r.violations.filter(v => ['serious', 'critical'].includes(v.impact))
        .map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target.join(' ') + ': ' + n.html.slice(0, 160))}));
}"""


def axe_script() -> Path:
    import axe_playwright_python

    return Path(axe_playwright_python.__file__).parent / "axe.min.js"


def test_no_serious_or_critical_violation_on_any_tab_after_a_chat_turn(page, app):  # noqa: F811
    page.fill("#chat-input textarea", "What is 2 plus 3?")
    page.keyboard.press("Enter")
    wait_reply(page, app[1], 1)
    page.add_script_tag(path=str(axe_script()))
    tabs = page.get_by_role("tab")
    names = [tabs.nth(i).inner_text() for i in range(tabs.count())]
    assert names == ["Chat", "Compare", "Long context", "Constant-memory lab", "System"]
    found = {}
    for i, name in enumerate(names):
        tabs.nth(i).click()
        page.wait_for_timeout(1000)  # the tab's plots and tables render
        violations = page.evaluate(AUDIT_JS)
        if violations:
            found[name] = violations
    assert not found, found


def test_on_a_phone_the_chat_fits_and_its_actions_are_one_row_of_icons(page, app):  # noqa: F811
    from test_browser import phone_page, save_shot

    with phone_page(page, app[0]) as phone:
        widths = phone.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert widths[0] <= widths[1] == 390, widths  # no horizontal scrolling
        boxes = [phone.locator(f"#chat-{name}").bounding_box()
                 for name in ("stop", "retry", "undo", "clear", "export", "import")]
        assert len({round(b["y"]) for b in boxes}) == 1, boxes  # one row
        assert all(b["x"] >= 0 and b["x"] + b["width"] <= 390 for b in boxes), boxes
        assert all(phone.locator(f"#chat-{name} img").count() == 1 for name in ("stop", "retry", "import"))
        assert phone.get_by_role("button", name="Retry").count() == 1  # the name stays for screen readers
        bar = phone.locator("#history.sidebar")  # the history sidebar starts closed, and opens by tap
        phone.wait_for_function("() => !document.querySelector('#history.sidebar').classList.contains('open')",
                                timeout=WAIT_MS)
        bar.locator(".toggle-button").tap()
        phone.wait_for_function("() => document.querySelector('#history.sidebar').classList.contains('open')",
                                timeout=WAIT_MS)
        bar.locator(".toggle-button").tap()
        phone.wait_for_function("() => !document.querySelector('#history.sidebar').classList.contains('open')",
                                timeout=WAIT_MS)
        phone.locator("#chat-input textarea").tap()
        phone.fill("#chat-input textarea", "What is 2 plus 3?")
        phone.locator("#chat-send").tap()
        phone.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=bot]').length > 0",
                                timeout=WAIT_MS)
        save_shot(phone, "phone.png", width=390)
