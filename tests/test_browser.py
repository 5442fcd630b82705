"""The app in a real browser (Debian's chromium through Playwright): chat, stop, retry, compare,
the constant-memory lab, and the series each plot draws.

Saves screenshots of the chat, compare and lab tabs to a temporary folder, or to
FM_DEMO_SCREENSHOT_DIR: `FM_DEMO_SCREENSHOT_DIR=docs python -m pytest tests/test_browser.py`
refreshes the README's.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import pytest
from test_ui_handlers import tiny_context
from tiny_fixtures import random_checkpoint

from fm_demo import lab
from fm_demo.settings import Preset, Settings
from fm_demo.ui import build_demo, launch_kwargs, queue_kwargs
from fm_demo.ui.lab_tab import CHUNKED, PARALLEL
from fm_demo.ui.readout import DEVICE_SERIES, KV_SERIES, MAMBA_SERIES

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
LONG = 2000  # max new tokens: a long reply, to stop mid-way (the page must stay responsive)
SHORT = 64  # for the replies in the screenshot (a worked sum is about 45 tokens)
WAIT_MS = 90_000
SHOTS = Path(os.environ.get("FM_DEMO_SCREENSHOT_DIR", Path(tempfile.gettempdir()) / "fm-demo-screenshots"))

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install chromium"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANDOM_LABEL = "Random-weight tiny (rarely ends a reply)"


def settings_with_random_model(path: str, **kwargs) -> Settings:
    """The app's settings plus one preset: random weights, so its replies run to max_new_tokens and
    there is always a long reply to stop (the trained tiny models answer in a few tokens)."""
    extra = Preset("random-tiny", RANDOM_LABEL, path, "instruct", ("fp32",), "fp32")

    class WithRandom(Settings):
        def presets(self):
            return {**super().presets(), extra.key: extra}

    return WithRandom(**kwargs)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    settings = settings_with_random_model(
        random_checkpoint("instruct", tmp_path_factory), device="cpu", max_new_tokens=LONG
    )
    ctx = tiny_context(settings, tmp_path_factory)
    demo = build_demo(settings, ctx).queue(**queue_kwargs(settings))
    _, url, _ = demo.launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        quiet=True,
        **launch_kwargs(settings),
    )
    yield url, ctx
    demo.close()


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        outside = []
        pg.on("request", lambda r: outside.append(r.url) if not r.url.startswith(app[0]) else None)
        pg.goto(app[0], wait_until="load")
        pg.wait_for_selector("#chat-input textarea", timeout=WAIT_MS)
        pg.outside_requests = outside
        yield pg
        browser.close()


@contextlib.contextmanager
def phone_page(page, url: str):
    """A page of the app in a 390 x 844 touch viewport, in the same browser as `page` (one
    Playwright per process), loaded and ready to chat."""
    context = page.context.browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                               has_touch=True)
    try:
        phone = context.new_page()
        phone.goto(url, wait_until="load")
        phone.wait_for_selector("#chat-input textarea", timeout=WAIT_MS)
        yield phone
    finally:
        context.close()


def bot_text(page, chatbot: str = "#chatbot") -> str:
    bots = page.locator(f"{chatbot} [data-testid='bot']")
    return bots.last.inner_text() if bots.count() else ""


def wait_for(predicate, what: str, timeout_s: float = WAIT_MS / 1000):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def session_conv(ctx, slot: str):
    convs = [c for (sid, s), c in ctx.store._convs.items() if s == slot]
    assert len(convs) == 1, f"expected one browser conversation in {slot}, found {len(convs)}"
    return convs[0]


def wait_reply(page, ctx, turns: int) -> None:
    """Until the chat has `turns` finished replies and the page shows the last one's readout."""

    def done() -> bool:
        convs = [c for (sid, s), c in ctx.store._convs.items() if s == "chat"]
        if len(convs) != 1 or len(convs[0].turns) != turns or convs[0].busy:
            return False
        conv = convs[0]
        shown = f"Tokens in context\n{conv.context_tokens:,}" in page.inner_text("#readout")
        return (
            conv.turns[-1].finish_reason is not None
            and shown
            and "streaming" not in page.inner_text("#readout")
        )

    wait_for(done, f"reply {turns} to finish")


def pick(page, dropdown: str, option: str) -> None:
    page.click(f"{dropdown} input")
    page.get_by_role("option", name=option).click()


def save_shot(page, name: str, width: int = 960, full_page: bool = True) -> None:
    """A screenshot (the full page, or the viewport), scaled to `width` and palettized so the
    README's PNGs stay small."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(page.screenshot(full_page=full_page))).convert("RGB")
    img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    SHOTS.mkdir(parents=True, exist_ok=True)
    # MAXCOVERAGE keeps a palette entry for each plot line's colour; MEDIANCUT merged the thin red
    # and blue lines into grey (they cover too few pixels)
    img.quantize(colors=128, method=Image.Quantize.MAXCOVERAGE).save(SHOTS / name, optimize=True)


_PLOT_JS = """(id) => {
    const root = document.getElementById(id);
    const legend = root && root.querySelector("g[aria-roledescription='legend']");
    const lines = {};
    (root ? root.querySelectorAll("g.mark-line path[aria-roledescription='line mark']") : []).forEach(p => {
        const m = /series: ([^;]*)/.exec(p.getAttribute("aria-label") || "");
        if (m) lines[m[1]] = {stroke: p.getAttribute("stroke"), d: p.getAttribute("d") || ""};
    });
    return {legend: legend ? legend.getAttribute("aria-label") : "", lines};
}"""


def plot_state(page, elem_id: str) -> dict:
    """What a plot's chart shows: the series its legend lists, and series -> (stroke, y values in
    pixels) of each line drawn. Vega's SVG names both in aria-labels: the legend as "... with 2
    values: A, B", each line by its first point ("x: 1; y: 2; series: A")."""
    raw = page.evaluate(_PLOT_JS, elem_id)
    listed = re.search(r"values?: (.*)$", raw["legend"])
    lines = {
        name: (line["stroke"], [float(y) for y in re.findall(r"[ML][-\d.e]+,([-\d.e]+)", line["d"])])
        for name, line in raw["lines"].items()
    }
    return {"legend": listed.group(1).split(", ") if listed else [], "lines": lines}


def wait_plot(page, elem_id: str, series: set[str], drawn: set[str] | None = None) -> dict:
    """Until the plot's legend lists exactly `series` and a coloured line is drawn for each of
    `drawn` (default: all of them) and for no other series."""
    drawn = series if drawn is None else drawn

    def shows() -> bool:
        state = plot_state(page, elem_id)
        coloured = {name for name, (stroke, ys) in state["lines"].items() if stroke and ys}
        return sorted(state["legend"]) == sorted(series) and coloured == drawn

    wait_for(shows, lambda: f"{elem_id} to draw {sorted(drawn)}: {plot_state(page, elem_id)}", timeout_s=20)
    return plot_state(page, elem_id)


def toggle_sampling(page) -> None:
    page.locator("#chat-sampling").get_by_text("Sampling", exact=True).click()


def set_number(page, elem_id: str, value) -> None:
    page.fill(f"{elem_id} input[type=number]", str(value))
    page.keyboard.press("Tab")


def test_reply_streams_and_stop_ends_it(page, app):
    pick(page, "#chat-model", RANDOM_LABEL)
    toggle_sampling(page)
    set_number(page, "#chat-temperature", 0)  # greedy: this model never ends a reply by itself
    toggle_sampling(page)
    page.fill("#chat-input textarea", "Tell me a long story about a fox.")
    page.keyboard.press("Enter")
    wait_for(lambda: len(bot_text(page)) > 0, "the first streamed text")
    first = bot_text(page)
    wait_for(
        lambda: len(bot_text(page)) > len(first),
        lambda: f"the reply to grow while streaming: {first!r} -> {page.inner_text('#readout')!r}",
    )
    assert "streaming" in page.inner_text("#readout")
    page.click("#chat-stop")
    wait_for(lambda: "cancelled" in page.inner_text("#readout"), "the reply to stop")
    stopped = bot_text(page)
    time.sleep(1.0)
    assert bot_text(page) == stopped  # nothing arrives after Stop
    m = session_conv(app[1], "chat").last_metrics
    assert m.finish_reason == "cancelled" and 0 < m.new_tokens < LONG


def test_retry_writes_a_new_reply_from_one_token(page, app):
    conv = session_conv(app[1], "chat")
    before = conv.last_metrics
    page.click("#chat-retry")
    wait_for(lambda: "streaming" in page.inner_text("#readout"), "the retried reply to stream")
    page.click("#chat-stop")
    wait_for(lambda: conv.last_metrics is not before and not conv.busy, "the retried reply to end")
    assert conv.last_metrics.prefilled_tokens == 1 and len(conv.turns) == 1  # retry re-reads one token
    assert page.locator("#chatbot [data-testid='user']").count() == 1
    page.click("#chat-clear")
    wait_for(lambda: page.locator("#chatbot [data-testid='user']").count() == 0, "the chat to clear")


def test_examples_and_turns_that_reuse_the_state_and_chat_screenshot(page, app):
    # a fresh page: its plots start from their first value (no data yet, every series named)
    page.reload(wait_until="load")
    page.wait_for_selector("#chat-input textarea", timeout=WAIT_MS)
    wait_plot(page, "chat-memory", {MAMBA_SERIES, KV_SERIES}, drawn=set())  # placeholders draw nothing
    pick(page, "#chat-model", app[1].settings.preset("tiny-instruct").label)
    toggle_sampling(page)
    set_number(page, "#chat-temperature", 0)
    set_number(page, "#chat-max-new", SHORT)
    toggle_sampling(page)
    # the example buttons fill the input; then a word to remember and its recall two turns later
    questions = ("What is 47 + 35?", "Remember the word falcon.", "Which word did I ask you to remember?")
    for turns, question in enumerate(questions, start=1):
        page.locator("#chat-examples").get_by_text(question, exact=True).click()
        wait_for(lambda q=question: page.input_value("#chat-input textarea") == q, f"the example {question!r} to fill the input")
        page.click("#chat-send")
        wait_reply(page, app[1], turns)
        if turns == 1:  # one turn already draws every line: memory from an empty context, rates over spans
            wait_plot(page, "chat-memory", {MAMBA_SERIES, KV_SERIES})
            wait_plot(page, "chat-speed", {"decode", "prefill"})
    conv = session_conv(app[1], "chat")
    readout = page.inner_text("#readout")
    reused = int(re.search(r"Reused from state cache\s+([\d,]+) tokens", readout).group(1).replace(",", ""))
    assert reused > 0 and reused == conv.last_metrics.reused_tokens
    assert conv.last_metrics.new_tokens <= SHORT
    assert conv.turns[-1].reply == "You asked me to remember the word falcon."  # carried by the state
    memory = wait_plot(page, "chat-memory", {MAMBA_SERIES, KV_SERIES})
    state_ys, kv_ys = memory["lines"][MAMBA_SERIES][1], memory["lines"][KV_SERIES][1]
    # from an empty context, then a point per turn; the state's line is flat
    assert len(set(state_ys)) == 1 and len(kv_ys) == 4
    # the KV line starts below the state and rises above it (SVG y grows down)
    assert kv_ys[0] > state_ys[0] > kv_ys[1] > kv_ys[2] > kv_ys[3]
    wait_plot(page, "chat-device-memory", {DEVICE_SERIES})
    wait_plot(page, "chat-speed", {"decode", "prefill"})
    time.sleep(1)
    save_shot(page, "chat.png")


def test_compare_streams_into_both_panes(page, app):
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_selector("#compare-input textarea", timeout=WAIT_MS)
    page.fill("#compare-input textarea", "What is the capital of Japan?")
    page.keyboard.press("Enter")
    wait_for(
        lambda: bot_text(page, "#compare-left") and bot_text(page, "#compare-right"), "both panes to stream"
    )
    done = ("length", "stop", "cancelled")
    wait_for(
        lambda: all(
            any(w in page.inner_text(f"#compare-{side}-readout") for w in done) for side in ("left", "right")
        ),
        "both replies to finish",
    )
    for side in ("left", "right"):
        assert session_conv(app[1], side).last_metrics.new_tokens > 0
    save_shot(page, "compare.png")
    assert page.outside_requests == []  # the page never reaches beyond the app's own server


def test_lab_draws_falcon_mamba_and_the_transformer(page, app):
    """Falcon Mamba's samples stream before the transformer's: every plot still draws both."""
    page.get_by_role("tab", name="Constant-memory lab").click()
    page.wait_for_selector("#lab-run", timeout=WAIT_MS)
    set_number(page, "#lab-tokens", 512)  # 64 samples of each; the KV cache outgrows the tiny state
    page.click("#lab-run")
    wait_for(lambda: "Done." in page.inner_text("#lab-note"), "the decode benchmark to finish")
    note = page.inner_text("#lab-note")
    assert lab.MAMBA in note and lab.TRANSFORMER in note
    both = {lab.MAMBA, lab.TRANSFORMER}
    for plot in ("lab-speed", "lab-memory"):
        wait_plot(page, plot, both)
    cache = wait_plot(page, "lab-cache", both)
    state_ys, kv_ys = cache["lines"][lab.MAMBA][1], cache["lines"][lab.TRANSFORMER][1]
    assert len(set(state_ys)) == 1 and kv_ys[0] > state_ys[0] > kv_ys[-1]  # flat state; the KV cache
    # starts below it and ends above it (SVG y grows downwards)
    set_number(page, "#lab-max-prompt", 4096)
    page.click("#lab-prefill-run")
    wait_for(lambda: "Done." in page.inner_text("#lab-prefill-note"), "the prefill sweep to finish")
    wait_plot(page, "lab-prefill", {PARALLEL, CHUNKED})
    time.sleep(1)
    save_shot(page, "lab.png")


def test_the_model_picker_offers_falcon3_beside_the_2024_models(page, app):
    """The preset list as a visitor sees it: the Falcon3-Mamba presets next to the 2024 ones."""
    page.get_by_role("tab", name="Chat").click()
    page.click("#chat-model input")
    options = page.get_by_role("option")
    wait_for(lambda: options.count() > 0, "the model list to open")
    labels = [options.nth(i).inner_text() for i in range(options.count())]
    settings = app[1].settings
    for key in ("falcon3-mamba-7b-instruct", "falcon3-mamba-7b-base", "7b-instruct"):
        assert settings.preset(key).label in labels, (key, labels)
    assert len(set(labels)) == len(labels)  # every label tells its model apart
    page.set_viewport_size({"width": 960, "height": 900})
    try:
        save_shot(page, "model-picker.png")
    finally:
        page.keyboard.press("Escape")
        page.set_viewport_size({"width": 1280, "height": 900})
