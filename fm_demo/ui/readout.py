"""The live readout panel and the per-conversation plots, rendered from ReplyMetrics.

Every number names its unit; the transformer comparison names its reference config and shows its
formula, so a reader can check it: Llama-3-8B / Mistral-7B in bf16 stores
2 (K, V) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 128 KiB per token of context.
"""

from __future__ import annotations

import html
from dataclasses import replace

import pandas as pd

from ..metrics import KV_REFERENCE, ReplyMetrics, device_memory, kv_cache_bytes
from ..settings import MiB
from .common import fmt_bytes, fmt_rate, fmt_seconds
from .plots import series_frame

# Legend labels are cut at about 25 characters: the KV series names its reference in the readout
MAMBA_SERIES, DEVICE_SERIES = "Falcon Mamba state", "whole-process memory"
KV_SERIES = "transformer KV cache"
# The state and the KV cache share a plot; whole-process memory has its own: at hundreds of MiB it
# would flatten the other two lines to zero on a shared axis.
MEMORY_COLORS = {MAMBA_SERIES: "#059669", KV_SERIES: "#dc2626"}
DEVICE_COLORS = {DEVICE_SERIES: "#6b7280"}
SPEED_COLORS = {"decode": "#059669", "prefill": "#2563eb"}
_MIB_COLUMNS = {"context tokens": "int64", "series": "object", "MiB": "float64"}
_SPEED_COLUMNS = {"context tokens": "int64", "series": "object", "tokens/s": "float64"}


def kv_formula(tokens: int) -> str:
    r = KV_REFERENCE
    return (
        f"{r.name}: 2 (K,V) x {r.layers} layers x {r.kv_heads} KV heads x {r.head_dim} dims x "
        f"{r.bytes_per_value} B = {fmt_bytes(r.bytes_per_token)}/token x {tokens:,} tokens"
    )


def _card(label: str, value: str, sub: str = "") -> str:
    sub_html = f"<div class='fm-sub'>{html.escape(sub)}</div>" if sub else ""
    return (
        f"<div class='fm-card'><div class='fm-label'>{html.escape(label)}</div>"
        f"<div class='fm-value'>{html.escape(value)}</div>{sub_html}</div>"
    )


def readout_html(m: ReplyMetrics | None, streaming: bool = False) -> str:
    """The panel for one reply's metrics (None: before the first reply)."""
    if m is None:
        return (
            "<div class='fm-readout fm-empty'>Send a message to see time to first token, speed, "
            "state-cache reuse and memory.</div>"
        )
    kv = kv_cache_bytes(m.context_tokens)
    ratio = f"{kv / m.state_bytes:,.1f}x the Mamba state" if m.state_bytes else ""
    reuse_sub = "cache hit" if m.cache_hit else f"{m.rebuilt_tokens:,} re-read after eviction"
    if m.rebuilt_reason:
        reuse_sub = f"{m.rebuilt_tokens:,} re-read: {m.rebuilt_reason}"
    mem_kind = "CUDA allocated" if m.device.startswith("cuda") else "process RSS"
    status = "streaming..." if streaming else (m.finish_reason or "")
    cards = [
        _card("Time to first token", fmt_seconds(m.ttft_s if m.new_tokens else None)),
        _card("Prefill", fmt_rate(m.prefill_tok_s), f"{m.prefilled_tokens:,} tokens read"),
        _card("Decode", fmt_rate(m.decode_tok_s), f"{m.new_tokens:,} tokens generated"),
        _card("Decoded in a batch of", f"{m.batch_size} {'reply' if m.batch_size == 1 else 'replies'}",
              f"mean {m.batch_mean:.1f} over this reply"),
        _card("Tokens in context", f"{m.context_tokens:,}"),
        _card("Reused from state cache", f"{m.reused_tokens:,} tokens", reuse_sub),
        _card("Recurrent state", fmt_bytes(m.state_bytes), f"{fmt_bytes(m.cache_bytes)} with turn snapshots"),
        _card(
            "Device memory",
            fmt_bytes(m.device_mem_bytes),
            f"peak {fmt_bytes(m.device_peak_bytes)} ({mem_kind})",
        ),
        _card("Transformer KV cache", fmt_bytes(kv), ratio),
    ]
    if m.replies > 1:  # Show N replies: one read of the prompt, n rows decoded in one batch
        cards.insert(1, _card("Replies from one read", f"{m.replies} replies",
                              f"{m.prefilled_tokens:,} prompt tokens read once, then {m.replies} batched rows"))
    if m.served_by:  # a cluster: which model replica, and how it had this conversation's state
        cards.append(_card("Served by", m.served_by, m.state_source))
    return (
        f"<div class='fm-readout'><div class='fm-status'>{html.escape(m.model)} · {html.escape(status)}</div>"
        f"<div class='fm-grid'>{''.join(cards)}</div>"
        f"<div class='fm-formula'>KV reference: {html.escape(kv_formula(m.context_tokens))} "
        f"= {fmt_bytes(kv)}</div></div>"
    )


def live_metrics(conv, m: ReplyMetrics) -> ReplyMetrics:
    """A streaming reply's metrics with the fields the conversation fills in only at its end."""
    engine = conv.lm.engine
    now, peak = device_memory(engine.device)
    return replace(
        m,
        context_tokens=conv.context_tokens,
        state_bytes=engine.state_nbytes(),
        cache_bytes=conv.cache_bytes(),
        device_mem_bytes=now,
        device_peak_bytes=peak,
    )


def plot_points(points: list[dict] | None, m: ReplyMetrics | None) -> list[dict]:
    """Per-turn points of the conversation plot; points past the current context (undone or
    edited turns) are dropped before the new one is added."""
    if m is None:
        return []
    kept = [p for p in points or [] if p["context"] < m.context_tokens]
    return kept + [turn_point(m)]


def trim_points(points: list[dict] | None, context_tokens: int) -> list[dict]:
    return [p for p in points or [] if p["context"] <= context_tokens]


def turn_point(m: ReplyMetrics) -> dict:
    """One point of the conversation plot, kept per session between turns."""
    return {
        "context": m.context_tokens,
        "state": m.state_bytes,
        "device": m.device_mem_bytes,
        "decode": m.decode_tok_s,
        "prefill": m.prefill_tok_s,
        # N replies count every row's tokens; the context grew by the shown one's
        "new": m.new_tokens if m.replies == 1 else max(0, m.context_tokens - m.reused_tokens - m.prefilled_tokens),
        "read": m.prefilled_tokens,
    }


def state_kv_frame(points: list[dict]) -> pd.DataFrame:
    """The recurrent state against the reference transformer's KV cache, per turn, from an empty
    context: the state has its full, fixed size before the first token, the KV cache none. So even
    one turn draws two lines."""
    rows = []
    for n, state in ([(0, points[0]["state"])] if points else []) + [(p["context"], p["state"]) for p in points]:
        rows += [
            {"context tokens": n, "series": MAMBA_SERIES, "MiB": state / MiB},
            {"context tokens": n, "series": KV_SERIES, "MiB": kv_cache_bytes(n) / MiB},
        ]
    return series_frame(rows, _MIB_COLUMNS, "context tokens", MEMORY_COLORS)


def device_frame(points: list[dict]) -> pd.DataFrame:
    """Device memory (CUDA allocated, or the process's RSS on CPU) at the end of each turn."""
    return device_memory_frame([(p["context"], p["device"]) for p in points], "context tokens")


def device_memory_frame(samples: list[tuple[int, int]], x: str) -> pd.DataFrame:
    """Device memory samples (x value, bytes) as the DEVICE_SERIES line over the axis `x`."""
    rows = [{x: n, "series": DEVICE_SERIES, "MiB": b / MiB} for n, b in samples]
    return series_frame(rows, {x: "int64", "series": "object", "MiB": "float64"}, x, DEVICE_COLORS)


def speed_frame(points: list[dict]) -> pd.DataFrame:
    """Each turn's prefill and decode rate over the span of context it covered: prefill from where
    the prompt's reading began to where the reply began, decode from there to the turn's end. A
    rate that stays flat as the context grows draws a flat line, from the first turn on."""
    rows = []
    for p in points:
        end = p["context"]
        start = end - p["new"]  # where the reply began
        spans = [("prefill", start - p["read"], start, p["prefill"]), ("decode", start, end, p["decode"])]
        for series, lo, hi, rate in spans:
            if hi > lo and rate > 0:  # a span with no rate (one token, nothing read) draws nothing
                rows += [{"context tokens": x, "series": series, "tokens/s": rate} for x in (lo, hi)]
    return series_frame(rows, _SPEED_COLUMNS, "context tokens", SPEED_COLORS)


CSS = """
.fm-readout {font-size: 0.9em;}
.fm-grid {display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 6px;}
.fm-card {border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px 8px;
          background: var(--background-fill-secondary);}
.fm-label {font-size: 0.8em; opacity: 0.75;}
.fm-value {font-size: 1.15em; font-weight: 600; font-variant-numeric: tabular-nums;}
.fm-sub {font-size: 0.75em; opacity: 0.7;}
.fm-status {margin-bottom: 4px; opacity: 0.8;}
.fm-formula {margin-top: 6px; font-size: 0.78em; opacity: 0.75;}
.fm-empty {opacity: 0.7; padding: 8px;}
.fm-history .wrap {flex-direction: column; flex-wrap: nowrap; align-items: stretch;}
.fm-history .wrap label {width: 100%; overflow: hidden; white-space: nowrap; text-overflow: ellipsis;}
"""
