"""The app's look: Gradio's Soft theme in emerald, with every text colour at WCAG AA contrast.

Soft's defaults draw white on emerald-500 buttons (2.5:1), emerald-500 labels on emerald-100
(2.2:1) and grey-400 secondary text (2.5:1); AA asks 4.5:1 for text this size. The same hues one
to three steps darker pass (tests/test_accessibility.py runs axe-core over every tab).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

ICONS = Path(__file__).resolve().parent / "icons"

AA = {
    "button_primary_background_fill": "*primary_700",
    "button_primary_background_fill_hover": "*primary_800",
    "button_primary_border_color": "*primary_700",
    "button_primary_border_color_hover": "*primary_800",
    "checkbox_label_background_fill_selected": "*primary_700",
    "block_label_text_color": "*primary_800",
    "block_title_text_color": "*primary_800",
    "body_text_color_subdued": "*neutral_600",
    "input_placeholder_color": "*neutral_500",
    "color_accent": "*primary_700",
    "slider_color": "*primary_700",
}


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="emerald").set(**AA)


def icon(name: str) -> str:
    """The path of a button icon (fm_demo/ui/icons/<name>.svg)."""
    return str(ICONS / f"{name}.svg")

# Gradio's JSON viewer (System tab) hard-codes pale syntax colours (keys #d18770 on white: 2.8:1);
# in the light theme these darker ones read at 7:1 or more.
CSS = """
@media (max-width: 640px) {  /* a phone: the chat's actions as one row of icons, names kept for screen readers */
  #chat-actions {flex-wrap: nowrap !important; gap: 4px !important;}
  #chat-actions > * {min-width: 0 !important; flex: 1 1 0 !important;}
  #chat-actions button {font-size: 0 !important; padding: 8px 0 !important; min-height: 40px;}
  #chat-actions button img {width: 20px !important; height: 20px !important; margin: 0 !important;}
}
body:not(.dark) [data-testid="json"] .json-node {
  --text-color: #9a3f1c !important; --string-color: #8a3d12 !important; --number-color: #245566 !important;
  --bracket-color: #35575a !important; --square-bracket-color: #922b36 !important;
  --punctuation-color: #3f5f5e !important; --line-number-color: #4e5661 !important;
}
"""

# Two Gradio components put ARIA where axe-core (WCAG 2 A) rejects it: an empty plot's placeholder
# is a <div aria-label="Empty value"> with no role, and a line plot's hover layer is an empty
# Vega symbol group (role graphics-symbol) with no text. The first gets role="img" so its label
# is valid; the second draws nothing, so it is hidden from assistive technology. A dataframe wider
# than its column scrolls inside a role="none" div that no key can reach: its first cell becomes
# focusable. A toast's header is a role="button" around its own close button: it becomes plain text.
# And Gradio's sidebar opens as it mounts, covering a phone's screen: there it is closed.
HEAD = """<script>
(() => {
  const fix = () => {
    document.querySelectorAll('div.empty[aria-label]:not([role])').forEach(e => e.setAttribute('role', 'img'));
    document.querySelectorAll('g.hover_marks[role="graphics-symbol"]:not([aria-hidden])').forEach(g => {
      if (!g.childElementCount) g.setAttribute('aria-hidden', 'true');
    });
    // a table wider than its column scrolls: its first header cell takes the keyboard focus, so
    // keyboard users can reach it and scroll (the scroller itself keeps role="none" for the grid)
    // a toast's header is a role="button" holding the toast's close button (nested-interactive):
    // the close button stays, the header is plain text (it only folds grouped messages)
    document.querySelectorAll('.toast-header[role="button"]').forEach(h => {
      h.removeAttribute('role'); h.removeAttribute('tabindex');
    });
    document.querySelectorAll('.virtual-table-viewport').forEach(v => {
      const cell = v.querySelector('th, td');
      if (cell && !v.querySelector('[tabindex="0"]')) cell.setAttribute('tabindex', '0');
    });
  };
  // on a phone the history sidebar starts closed (open, it would cover the chat); it is closed
  // until the visitor opens it (Gradio opens it as it mounts, so a few tries may be needed)
  let touched = false, tries = 0, waiting = false;
  document.addEventListener('click', e => {
    if (e.isTrusted && e.target.closest?.('#history .toggle-button')) touched = true;
  }, true);
  const closeSidebarOnPhone = () => {
    if (touched || tries >= 20 || window.innerWidth >= 640) return phoneWatch.disconnect();
    const bar = document.querySelector('#history.sidebar');
    if (!bar || waiting || !bar.classList.contains('open')) return;
    tries += 1; waiting = true;
    bar.querySelector('.toggle-button')?.click();
    setTimeout(() => { waiting = false; closeSidebarOnPhone(); }, 250);
  };
  const phoneWatch = new MutationObserver(closeSidebarOnPhone);
  phoneWatch.observe(document.documentElement, {subtree: true, childList: true, attributes: true, attributeFilter: ['class']});
  new MutationObserver(fix).observe(document.documentElement, {subtree: true, childList: true});
})();
</script>"""
