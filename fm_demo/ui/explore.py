"""Exploring a conversation in the chat tab: branches, N replies, token probabilities, a rewind.

A fork costs one state copy, so the chat keeps every version of a turn (conversations/turns.py):
- each reply with other versions shows `‹ 2/3 ›` beside its buttons; every reply also offers
  "New chat from here" and "Compare from here". The page draws these from `branch_data` (one
  small JSON list in the hidden #chat-branches component, whose script adds them to the chatbot's
  messages and sends their clicks back as one `act` event);
- "Show N replies" streams N replies from one read side by side (#chat-many), each with a button
  that makes it the conversation's version (`act` with a switch);
- the token view (#chat-token-view) colours each token of a reply by its probability (the
  numbers the API's logprobs return: engine/decode.py computes both) and lists its likeliest
  alternatives on hover, focus or tap; choosing one rewinds the reply there (Conversation.rewind).
Every page value the scripts send back is checked here: an unknown action or a turn, version,
position or token out of range gets a message, never an exception deeper down.
"""

from __future__ import annotations

import html
import json
import math

import gradio as gr

from ..conversations.turns import ConversationError

# The shown reply's versions and each reply's actions, added to the chatbot's messages. The
# chatbot redraws its messages as they stream: an observer puts the controls back each time.
BRANCH_JS = r"""
const chat = () => document.querySelector('#chatbot');
const rows = c => Array.from(c.querySelectorAll('.message-row.bot-row'));
const mk = (tag, cls, text, label, data) => {
  const e = document.createElement(tag);
  e.className = cls; if (text) e.textContent = text;
  if (label) { e.setAttribute('aria-label', label); e.title = label; }
  if (tag === 'button') e.type = 'button';
  Object.assign(e.dataset, data || {});
  return e;
};
const draw = () => {
  const c = chat(); if (!c) return;
  let data = [];
  try { data = JSON.parse(props.value || '[]'); } catch (e) { data = []; }
  const bots = rows(c);
  bots.forEach((row, b) => {
    const d = data[b];
    const key = d ? `${d.turn}:${d.k}:${d.n}` : '';
    const sib = row.nextElementSibling;  // the reply's copy / retry / undo buttons, when drawn
    const host = sib && sib.classList.contains('message-buttons') ? sib : row;
    const stale = (host === sib ? row : sib)?.querySelector?.(':scope > .fm-branch');
    if (stale) stale.remove();
    let bar = host.querySelector(':scope > .fm-branch');
    if (bar && bar.dataset.key === key) return;
    if (bar) bar.remove();
    if (!d) return;
    bar = mk('div', 'fm-branch', '', '', {key});
    if (d.n > 1) {
      const nav = mk('span', 'fm-branch-nav', '', '', {});
      nav.setAttribute('role', 'group');
      nav.setAttribute('aria-label', `version ${d.k} of ${d.n} of this reply`);
      const prev = mk('button', 'fm-branch-prev', '‹', 'previous version', {action: 'switch', turn: d.turn, version: d.k - 2});
      const next = mk('button', 'fm-branch-next', '›', 'next version', {action: 'switch', turn: d.turn, version: d.k});
      prev.disabled = d.k <= 1; next.disabled = d.k >= d.n;
      nav.append(prev, mk('span', 'fm-branch-count', `${d.k}/${d.n}`, '', {}), next);
      bar.append(nav);
    }
    bar.append(mk('button', 'fm-branch-new', '⎇ New chat from here', 'new chat from here', {action: 'newchat', turn: d.turn}));
    bar.append(mk('button', 'fm-branch-compare', '⇆ Compare from here', 'compare from here', {action: 'compare', turn: d.turn}));
    host.append(bar);
  });
};
let queued = false;
const later = () => { if (!queued) { queued = true; requestAnimationFrame(() => { queued = false; draw(); }); } };
const hook = () => {
  const c = chat();
  if (!c) { setTimeout(hook, 200); return; }
  new MutationObserver(later).observe(c, {childList: true, subtree: true});
  c.addEventListener('click', e => {
    const b = e.target.closest('.fm-branch button');
    if (!b || b.disabled) return;
    e.stopPropagation();
    trigger('click', {action: b.dataset.action, turn: Number(b.dataset.turn), version: Number(b.dataset.version ?? -1)});
  }, true);
  draw();
};
hook();
watch('value', later);
"""

# The token view and the N-replies panel: their buttons carry what to do in data attributes.
CLICK_JS = r"""
element.addEventListener('click', e => {
  const b = e.target.closest('button[data-action]');
  if (!b || b.disabled) return;
  const n = k => Number(b.dataset[k] ?? -1);
  trigger('click', {action: b.dataset.action, turn: n('turn'), version: n('version'), pos: n('pos'), token: n('token')});
});
"""

CSS = """
#chat-branches {display: none !important;}
.message-buttons:has(> .fm-branch) {display: flex; flex-wrap: wrap; align-items: center; gap: 6px;}
.fm-branch {display: flex; flex-wrap: wrap; gap: 6px; align-items: center; margin: 2px 0 6px 6px; font-size: 13px;}
.fm-branch button {border: 1px solid var(--border-color-primary); border-radius: 6px; background: var(--background-fill-primary);
  color: var(--body-text-color); padding: 2px 8px; min-height: 28px; cursor: pointer;}
.fm-branch button:disabled {opacity: .45; cursor: default;}
.fm-branch-nav {display: inline-flex; align-items: center; gap: 4px;}
.fm-branch-count {min-width: 2.5em; text-align: center; font-variant-numeric: tabular-nums;}
.fm-tokens {line-height: 2; font-size: 15px;}
.fm-tok-head {font-size: 13px; color: var(--body-text-color-subdued); margin-bottom: 4px;}
.fm-legend span {padding: 0 6px; border-radius: 4px; color: #111827;}
.fm-tok {position: relative; border-radius: 3px; padding: 1px 0; color: #111827; white-space: pre-wrap; cursor: pointer;}
.fm-tok:focus {outline: 2px solid #047857;}
.fm-pop {display: none; position: absolute; z-index: 50; left: 0; top: 1.9em; min-width: 220px; background: #fff;
  color: #111827; border: 1px solid #9ca3af; border-radius: 6px; padding: 6px; box-shadow: 0 4px 12px rgba(0,0,0,.15);
  line-height: 1.4; font-size: 13px; white-space: normal;}
.fm-tok:hover > .fm-pop, .fm-tok:focus > .fm-pop, .fm-tok:focus-within > .fm-pop {display: block;}
.fm-pop button, .fm-pop .fm-alt-row {display: flex; justify-content: space-between; gap: 12px; width: 100%; padding: 3px 6px;
  border: 0; border-radius: 4px; background: transparent; color: #111827; text-align: left; cursor: pointer; font: inherit;}
.fm-pop button:hover:not(:disabled), .fm-pop button:focus {background: #d1fae5;}
.fm-pop button:disabled {cursor: default; opacity: 1; color: #111827; font-weight: 600;}
.fm-pop code {white-space: pre; background: #f3f4f6; color: #111827; padding: 0 3px; border-radius: 3px;}
.fm-many {display: flex; gap: 10px; overflow-x: auto;}
.fm-many-col {flex: 1 1 0; min-width: 180px; border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px;
  display: flex; flex-direction: column; gap: 6px;}
.fm-many-col.fm-shown {border: 2px solid #047857;}
.fm-many-head {font-size: 13px; color: var(--body-text-color-subdued);}
.fm-many-text {white-space: pre-wrap; flex: 1;}
.fm-many-col button {border-radius: 6px; border: 1px solid #047857; background: #047857; color: #fff; padding: 4px 8px; cursor: pointer;}
.fm-many-col button:disabled {background: transparent; color: #065f46; cursor: default;}
"""


def branch_data(conv) -> str:
    """For each reply the chatbot shows, in order: its turn and its versions (k of n; n = 1: none)."""
    if conv is None:
        return "[]"
    points = conv.branch_points()
    out = []
    for i, t in enumerate(conv.turns):
        if t.reply_ids or t.finish_reason:  # the turns Conversation.messages shows a reply for
            k, n = points.get(i, (1, 1))
            out.append({"turn": i, "k": k, "n": n})
    return json.dumps(out)


def _pct(p: float) -> str:
    if 0 < p < 0.0005:
        return "<0.1%"
    return f"{100 * p:.1f}%"


def _colour(p: float) -> str:
    """A light tint from red (unlikely) through amber to green (sure): dark text stays at AA contrast."""
    return f"hsl({round(120 * max(0.0, min(1.0, p)))} 85% 86%)"


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as it adds to the reply (a character split over two tokens shows on the second)."""
    out = []
    for j in range(len(ids)):  # a window of 8 tokens before: enough for any character's bytes
        text = tokenizer.decode(ids[max(0, j - 8):j + 1], skip_special_tokens=False)
        head = tokenizer.decode(ids[max(0, j - 8):j], skip_special_tokens=False)
        out.append(text[len(head):] if text.startswith(head) else text)
    return out


def alternatives(turn, pos: int) -> tuple[list[tuple[int, float]], float]:
    """The likeliest tokens at reply position `pos` as (token, probability), the chosen one first
    when it is not among them, and the probability of all the others."""
    lp, top = turn.logprobs[pos]
    rows = [(int(t), math.exp(v)) for t, v in top]
    chosen = turn.reply_ids[pos]
    if chosen not in {t for t, _ in rows}:
        rows.insert(0, (chosen, math.exp(lp)))
    return rows, max(0.0, 1.0 - sum(p for _, p in rows))


def token_view_html(conv, turn_index: int | None) -> str:
    """Reply `turn_index` (None: the last one) with each token coloured by its probability."""
    if conv is None or not conv.turns:
        return "<div class='fm-tokens fm-empty'>Token probabilities appear here after a reply.</div>"
    i = len(conv.turns) - 1 if turn_index is None or not 0 <= turn_index < len(conv.turns) else turn_index
    turn = conv.turns[i]
    if not turn.reply_ids or not turn.logprobs or len(turn.logprobs) != len(turn.reply_ids):
        return (f"<div class='fm-tokens fm-empty'>Reply {i + 1} has no token probabilities "
                "(it was written before they were kept, or restored from the history).</div>")
    tok, stops = conv.lm.tokenizer, set(conv.stop_ids())
    spans = []
    for pos, (piece, entry) in enumerate(zip(_pieces(tok, turn.reply_ids), turn.logprobs)):
        if entry is None:
            spans.append(f"<span class='fm-tok'>{html.escape(piece)}</span>")
            continue
        p = math.exp(entry[0])
        rows, rest = alternatives(turn, pos)
        buttons = []
        for t, q in rows:
            text = html.escape(repr(tok.decode([t], skip_special_tokens=False))[1:-1] or "∅")
            if t == turn.reply_ids[pos]:
                buttons.append(f"<button disabled data-p='{q:.6g}' aria-label='chosen: {text} ({_pct(q)})'><span>✓ "
                               f"<code>{text}</code></span><span>{_pct(q)}</span></button>")
            elif t in stops:
                buttons.append(f"<button disabled data-p='{q:.6g}' title='ends the reply'><span><code>{text}</code> (end)</span>"
                               f"<span>{_pct(q)}</span></button>")
            else:
                buttons.append(f"<button data-action='rewind' data-turn='{i}' data-pos='{pos}' data-token='{t}' data-p='{q:.6g}' "
                               f"aria-label='continue with {text} ({_pct(q)})'><span><code>{text}</code></span>"
                               f"<span>{_pct(q)}</span></button>")
        buttons.append(f"<div class='fm-alt-row fm-rest' data-p='{rest:.6g}'><span>all other tokens</span>"
                       f"<span>{_pct(rest)}</span></div>")
        label = html.escape(f"{piece!r}: {_pct(p)}")
        spans.append(f"<span class='fm-tok' tabindex='0' role='button' aria-label='{label}' data-p='{p:.6f}' "
                     f"style='background:{_colour(p)}'>{html.escape(piece)}<span class='fm-pop' role='tooltip'>"
                     f"{''.join(buttons)}</span></span>")
    legend = "".join(f"<span style='background:{_colour(p)}'>{label}</span>"
                     for p, label in ((0.05, "5%"), (0.3, "30%"), (0.6, "60%"), (0.95, "95%")))
    return (f"<div class='fm-tokens' data-turn='{i}'><div class='fm-tok-head'>Reply {i + 1}: each token coloured by "
            f"its probability <span class='fm-legend'>{legend}</span>. Hover or tap a token for the likeliest "
            f"alternatives; choose one to continue from it as a new version. Click a reply in the chat to see "
            f"its tokens.</div><div>{''.join(spans)}</div></div>")


def many_html(texts: list[str], turn: int, shown: int | None, done: bool) -> str:
    """N replies side by side; once done, each can become the conversation's version."""
    cols = []
    for k, text in enumerate(texts):
        is_shown = done and shown == k
        if not done:
            button = ""
        elif is_shown:
            button = "<button disabled>Shown in the chat</button>"
        else:
            button = (f"<button data-action='switch' data-turn='{turn}' data-version='{k}' "
                      f"aria-label='use reply {k + 1}'>Use this reply</button>")
        cols.append(f"<div class='fm-many-col{' fm-shown' if is_shown else ''}' data-version='{k}'>"
                    f"<div class='fm-many-head'>Reply {k + 1} of {len(texts)}</div>"
                    f"<div class='fm-many-text'>{html.escape(text)}</div>{button}</div>")
    return f"<div class='fm-many' data-turn='{turn}'>{''.join(cols)}</div>"


def many_for(conv, turn: int) -> str | None:
    """The N-replies panel for `turn`: each version's reply, the shown one marked (None: the turn
    has no versions)."""
    fork = conv.forks.get(turn)
    if fork is None:
        return None
    texts = [conv.turns[turn].reply if b is None else b.turns[0].reply for b in fork.branches]
    return many_html(texts, turn, fork.active, done=True)


def event_ints(evt: gr.EventData | None, *names: str) -> dict:
    """The named integers of a page event's data; anything else is refused with a message."""
    data = getattr(evt, "_data", None)
    if not isinstance(data, dict):
        raise ConversationError("that action came without its data; reload the page")
    out = {}
    for name in names:
        v = data.get(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
            raise ConversationError(f"that action's {name} is not a whole number")
        out[name] = int(v)
    return out


def event_action(evt: gr.EventData | None, allowed: tuple[str, ...]) -> str:
    data = getattr(evt, "_data", None)
    action = data.get("action") if isinstance(data, dict) else None
    if action not in allowed:
        raise ConversationError(f"unknown action {str(action)[:40]!r}")
    return action
