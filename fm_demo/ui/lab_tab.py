"""Constant-memory lab tab: the blog's figure, measured live on this machine.

Runs fm_demo.lab: N greedy tokens from Falcon Mamba and then from a random-weight Llama-style
model of similar parameter count; and, on a button of its own, the prefill peak-memory sweep.
Plots refresh a few times a second.

Sharing the device: the lab's events run one at a time (concurrency id LAB), one per client,
with at most lab_max_waiting behind it (limits.py), and no larger than lab_max_tokens and
lab_max_seconds allow. The sweep's parallel pass, which runs out of memory on purpose, runs only
on a device nobody else is using (the CPU, or a GPU with no request running on any model);
otherwise its figure is computed (lab.parallel_estimate) and the plot and note say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Iterator

import gradio as gr
import pandas as pd
import torch

from .. import lab
from ..metrics import free_device_memory
from ..settings import MiB
from .common import (
    AppContext,
    fmt_bytes,
    load_progress,
    model_pickers,
    on_preset_change,
    session_id,
    throttle,
    user_errors,
)
from .inputs import bind
from .limits import LAB, limited
from .plots import series_frame, series_plot

PLOT_UPDATES_PER_S = 3.0  # plots redraw whole; a few frames a second reads as live
DECODE_COLORS = {lab.MAMBA: "#059669", lab.TRANSFORMER: "#dc2626"}  # the chat tab's state and KV colours
PARALLEL, CHUNKED, COMPUTED = "parallel (one pass)", "chunked prefill", "parallel (computed)"
PREFILL_COLORS = {PARALLEL: "#dc2626", CHUNKED: "#059669", COMPUTED: "#f59e0b"}


SAMPLES_PER_RUN = 64  # points on each decode line: smooth, and cheap to redraw whole


@dataclass(frozen=True)
class LabSizes:
    """Where the lab's sliders start and end: tokens to generate, longest prompt, time limit."""

    tokens: int
    max_tokens: int
    prompt: int
    max_prompt: int
    limit_s: int


CPU_SIZES = LabSizes(tokens=2048, max_tokens=16384, prompt=8192, max_prompt=32768, limit_s=60)
CUDA_SIZES = LabSizes(tokens=32768, max_tokens=262144, prompt=65536, max_prompt=262144, limit_s=300)


def sizes_for(device: str, max_tokens: int = 0, max_seconds: float = 1800.0) -> LabSizes:
    """Thousands of tokens on CPU, 100k+ on a GPU; within the server's lab bounds (lab_max_tokens,
    0: none; lab_max_seconds)."""
    s = CUDA_SIZES if device == "cuda" else CPU_SIZES
    cap = max_tokens or max(s.max_tokens, s.max_prompt)
    seconds = int(max_seconds)
    return LabSizes(tokens=min(s.tokens, cap), max_tokens=min(s.max_tokens, cap), prompt=min(s.prompt, cap),
                    max_prompt=min(s.max_prompt, cap), limit_s=min(s.limit_s, seconds))


def lab_sizes(ctx: AppContext) -> LabSizes:
    st = ctx.settings
    return sizes_for(st.device, st.lab_max_tokens, st.lab_max_seconds)


def device_is_free(ctx: AppContext, device: torch.device) -> bool:
    """Whether a measurement may run the device out of memory: always on the CPU (a failed
    allocation there fails the measurement alone), on a GPU only while no loaded model has a
    request running or waiting."""
    return device.type != "cuda" or not any(lm.runner.in_use() for lm in ctx.manager.loaded())


def decode_frame(samples: list[lab.Sample]) -> pd.DataFrame:
    rows = [
        {
            "tokens generated": s.tokens,
            "series": s.series,
            "tokens/s": round(s.tok_s, 2),
            "cache MiB": s.cache_bytes / MiB,
            "memory MiB": s.memory_bytes / MiB,
        }
        for s in samples
    ]
    dtypes = {
        "tokens generated": "int64",
        "series": "object",
        "tokens/s": "float64",
        "cache MiB": "float64",
        "memory MiB": "float64",
    }
    # Falcon Mamba's samples stream first: the transformer needs its placeholder row until its own come
    return series_frame(rows, dtypes, "tokens generated", DECODE_COLORS)


def prefill_frame(peaks: list[lab.PrefillPeak]) -> pd.DataFrame:
    rows = []
    for p in peaks:
        if p.parallel_bytes is not None:
            rows.append(
                {
                    "prompt tokens": p.prompt_tokens,
                    "series": COMPUTED if p.parallel_computed else PARALLEL,
                    "peak MiB": p.parallel_bytes / MiB,
                }
            )
        rows.append(
            {
                "prompt tokens": p.prompt_tokens,
                "series": CHUNKED,
                "peak MiB": p.chunked_bytes / MiB,
            }
        )
    dtypes = {"prompt tokens": "int64", "series": "object", "peak MiB": "float64"}
    # the legend lists the parallel pass as measured, or as computed where none was measured
    parallel = COMPUTED if any(p.parallel_computed for p in peaks) else PARALLEL
    return series_frame(rows, dtypes, "prompt tokens", (parallel, CHUNKED))


def summary(samples: list[lab.Sample], ref_config, note: str) -> str:
    lines = [note]
    for series in (lab.MAMBA, lab.TRANSFORMER):
        mine = [s for s in samples if s.series == series]
        if len(mine) >= 2:
            first, last = mine[0], mine[-1]
            lines.append(
                f"- **{series}**: {last.tokens:,} tokens; {first.tok_s:,.0f} -> {last.tok_s:,.0f} tok/s; "
                f"cache {fmt_bytes(first.cache_bytes)} -> {fmt_bytes(last.cache_bytes)}"
            )
    if ref_config is not None:
        c = ref_config
        lines.append(
            f"- Transformer used: {c.num_hidden_layers} layers x {c.num_key_value_heads} KV heads x "
            f"{c.head_dim} dims (hidden {c.hidden_size}, random weights); KV cache grows by "
            f"2 x {c.num_hidden_layers} x {c.num_key_value_heads} x {c.head_dim} x bytes/value per token."
        )
    return "\n".join(lines)


@user_errors
def run_decode(
    ctx: AppContext,
    preset: str,
    precision: str,
    n_tokens: int,
    limit_s: float,
    request: gr.Request,
    progress=gr.Progress(),
) -> Iterator[tuple]:
    """Stream (tok/s frame, memory frame, summary) while both models generate n_tokens."""
    session_id(request)
    n_tokens, sizes = int(n_tokens), lab_sizes(ctx)
    if n_tokens < 2:
        raise gr.Error("Generate at least 2 tokens.")
    if n_tokens > sizes.max_tokens or float(limit_s) > ctx.settings.lab_max_seconds:
        raise gr.Error(f"This server runs lab measurements of up to {sizes.max_tokens:,} tokens and "
                       f"{ctx.settings.lab_max_seconds:,.0f} s per model.")
    loaded = ctx.manager.get(preset, precision, progress=load_progress(progress))
    every = max(1, n_tokens // SAMPLES_PER_RUN)
    samples: list[lab.Sample] = []
    note = f"Measuring {loaded.preset.label} ({loaded.precision}), then the transformer..."
    transformer = lab.similar_transformer(loaded.model)
    try:
        runs = chain(
            lab.mamba_decode(loaded.engine, n_tokens, every, limit_s),
            lab.transformer_decode(transformer, n_tokens, every, limit_s),
        )
        for _ in throttle(_kept(runs, samples), hz=PLOT_UPDATES_PER_S):
            frame = decode_frame(samples)
            yield frame, frame, frame, summary(samples, None, note)
        ref = transformer.config
    finally:
        del transformer
        free_device_memory(loaded.engine.device)
    frame = decode_frame(samples)
    stopped = [
        s for s in (lab.MAMBA, lab.TRANSFORMER) if max(x.tokens for x in samples if x.series == s) < n_tokens
    ]
    done = (
        "Done." if not stopped else f"Done; stopped at the {limit_s:.0f} s time limit: {', '.join(stopped)}."
    )
    yield frame, frame, frame, summary(samples, ref, done)


def _kept(samples: Iterator[lab.Sample], into: list[lab.Sample]) -> Iterator[lab.Sample]:
    """`samples`, each appended to `into` as it comes (the plots draw them all)."""
    for sample in samples:
        into.append(sample)
        yield sample


@user_errors
def run_prefill(
    ctx: AppContext, preset: str, precision: str, max_prompt: int, request: gr.Request, progress=gr.Progress()
) -> Iterator[tuple]:
    """Stream (peak-memory frame, note) for prompt lengths doubling up to max_prompt."""
    session_id(request)
    cap = lab_sizes(ctx).max_prompt
    if int(max_prompt) > cap:
        raise gr.Error(f"This server sweeps prompts of up to {cap:,} tokens.")
    loaded = ctx.manager.get(preset, precision, progress=load_progress(progress))
    chunk = loaded.engine.chunk_size
    lengths = lab.sweep_lengths(chunk, int(max_prompt))
    if not lengths:
        raise gr.Error(f"Pick a longest prompt of at least {chunk} tokens.")
    peaks: list[lab.PrefillPeak] = []
    free = lambda: device_is_free(ctx, loaded.engine.device)  # noqa: E731
    for peak in lab.prefill_peaks(loaded.engine, lengths, chunk, parallel_ok=free):
        peaks.append(peak)
        yield prefill_frame(peaks), f"Measured up to {peak.prompt_tokens:,} tokens..."
    free_device_memory(loaded.engine.device)
    yield prefill_frame(peaks), sweep_note(peaks, loaded.engine.device, chunk)


def sweep_note(peaks: list[lab.PrefillPeak], device: torch.device, chunk: int) -> str:
    """What the sweep measured, and which parallel figures were computed instead (and why)."""
    where = "CUDA allocator peak" if device.type == "cuda" else "process RSS peak (CPU, noisy)"
    note = (f"Done. Peak memory above the idle level, measured as {where}; chunked prefill reads "
            f"{chunk:,} tokens per chunk.")
    computed = [p.prompt_tokens for p in peaks if p.parallel_computed]
    if computed:
        note += (f" The parallel pass was not run for {len(computed)} of {len(peaks)} lengths "
                 f"({', '.join(f'{n:,}' for n in computed)} tokens): this GPU was serving other requests, and "
                 "that pass runs out of memory on purpose. Its figure there is computed from the chunked "
                 "pass (activations grow with the tokens read at once) and drawn as "
                 f"'{COMPUTED}'.")
    return note


def build_lab_tab(ctx: AppContext) -> None:
    s = lab_sizes(ctx)
    gr.Markdown(
        "Generate tokens at batch 1 and watch speed and memory. Falcon Mamba carries a fixed-size "
        "recurrent state; a transformer of similar parameter count (Llama-style, random weights: "
        "speed and memory depend only on shapes) appends K and V for every token to its cache."
    )
    with gr.Row():
        preset, precision = model_pickers(ctx, ctx.settings.default_preset)
        n_tokens = gr.Slider(
            64, s.max_tokens, value=s.tokens, step=64, label="Tokens to generate", elem_id="lab-tokens"
        )
        limit_s = gr.Slider(10, int(ctx.settings.lab_max_seconds), value=s.limit_s, step=10,
                            label="Time limit per model (s)")
    with gr.Row():
        run_btn = gr.Button("Run decode benchmark", variant="primary", elem_id="lab-run")
        stop_btn = gr.Button("Stop", variant="stop")
    note = gr.Markdown(elem_id="lab-note")
    with gr.Row():
        speed_plot = series_plot(
            DECODE_COLORS,
            x="tokens generated",
            y="tokens/s",
            height=300,
            title="Decode speed (tokens/s) vs tokens generated",
            y_lim=[0, None],
            elem_id="lab-speed",
        )
        mem_plot = series_plot(
            DECODE_COLORS,
            x="tokens generated",
            y="cache MiB",
            height=300,
            title="Per-sequence cache (MiB): recurrent state vs KV cache",
            y_lim=[0, None],
            elem_id="lab-cache",
        )
    device_plot = series_plot(
        DECODE_COLORS,
        x="tokens generated",
        y="memory MiB",
        height=260,
        title=(
            "Device memory allocated (MiB, CUDA allocator)"
            if ctx.settings.device == "cuda"
            else "Process memory (MiB, RSS: weights of both models + caches; CPU, noisy)"
        ),
        elem_id="lab-memory",
    )
    gr.Markdown("### Longest prompt that fits: peak memory of reading a prompt")
    with gr.Row():
        max_prompt = gr.Slider(
            256, s.max_prompt, value=s.prompt, step=256, label="Longest prompt (tokens)",
            elem_id="lab-max-prompt",
        )
        prefill_btn = gr.Button("Run prefill sweep", variant="primary", elem_id="lab-prefill-run")
    prefill_note = gr.Markdown(elem_id="lab-prefill-note")
    prefill_plot = series_plot(
        PREFILL_COLORS,
        x="prompt tokens",
        y="peak MiB",
        height=300,
        y_lim=[0, None],
        title="Peak memory (MiB) vs prompt length: parallel vs chunked prefill",
        elem_id="lab-prefill",
    )

    preset.input(bind(on_preset_change, ctx.settings), preset, precision, api_name="lab_precisions")
    # One measurement at a time on the device, one per client (limits.py refuses a second)
    decode_ev = run_btn.click(
        limited(bind(run_decode, ctx)),
        [preset, precision, n_tokens, limit_s],
        [speed_plot, mem_plot, device_plot, note],
        api_name="lab_decode",
        concurrency_limit=1,
        concurrency_id=LAB,
    )
    stop_btn.click(None, None, None, cancels=[decode_ev], api_name="lab_stop")
    prefill_btn.click(
        limited(bind(run_prefill, ctx)),
        [preset, precision, max_prompt],
        [prefill_plot, prefill_note],
        api_name="lab_prefill",
        concurrency_limit=1,
        concurrency_id=LAB,
    )
