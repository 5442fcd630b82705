"""System tab: the machine, library versions, which kernel path each op runs, loaded models."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path

import gradio as gr

from ..metrics import device_memory
from .common import AppContext, fmt_bytes, user_errors
from .inputs import bind

log = logging.getLogger("fm_demo.ui")
LIBRARIES = (
    "torch",
    "transformers",
    "gradio",
    "gradio_client",
    "tokenizers",
    "accelerate",
    "bitsandbytes",
    "mamba_ssm",
    "causal_conv1d",
    "kernels",
    "huggingface_hub",
)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine(ctx: AppContext) -> dict[str, str]:
    from ..zerogpu import hardware_info

    info = hardware_info()
    now, peak = device_memory(ctx.settings.device)
    what = "CUDA allocated" if ctx.settings.device == "cuda" else "process RSS"
    info["memory"] = f"{fmt_bytes(now)} now, {fmt_bytes(peak)} peak ({what})"
    return info


def models_table(ctx: AppContext) -> list[list[str]]:
    rows = []
    for lm in ctx.manager.loaded():
        kernels = lm.engine.kernel_report()
        paths = ", ".join(f"{op}: {path}" for op, path in kernels.items() if op != "reason")
        rows.append(
            [
                lm.label,
                lm.device,
                fmt_bytes(lm.nbytes),
                f"{lm.load_s:.1f} s",
                paths,
                kernels.get("reason", ""),
                "; ".join(lm.notes),
            ]
        )
    return rows


SERVING_HEADERS = ["model", "runner", "decoding", "reading prompts", "waiting", "last batch", "max batch",
                   "tok/s (all replies)", "state memory in use", "decode steps", "busy refusals"]
CACHE_HEADERS = ["model", "states", "memory", "budget", "shared across sessions", "hit rate (requests)",
                 "hit rate (tokens)", "evictions"]


def serving_table(ctx: AppContext) -> list[list]:
    """One row per loaded model: what its scheduler is doing now (continuous batching)."""
    rows = []
    for lm in ctx.manager.loaded():
        st = lm.runner.stats()
        if st.get("runner") != "batched":
            rows.append([lm.label, st.get("runner", "")] + [""] * (len(SERVING_HEADERS) - 2))
            continue
        rows.append([lm.label, "batched", st["decoding"], st["reading"], st["waiting"], st["last_batch"],
                     st["max_batch"], f"{st['agg_tok_s']:,.1f}", fmt_bytes(st["state_bytes_active"]),
                     st["steps"], st["busy_refusals"]])
    return rows


def cache_table(ctx: AppContext) -> list[list]:
    """One row per loaded model: its prefix-state cache (serving/prefix_cache.py)."""
    rows = []
    for lm in ctx.manager.loaded():
        pc = lm.prefix_cache.stats()
        rows.append([lm.label, pc["states"], fmt_bytes(pc["bytes"]), fmt_bytes(pc["budget_bytes"]),
                     "yes" if pc["shared"] else "no", f"{pc['hit_rate']:.0%}", f"{pc['token_hit_rate']:.0%}",
                     pc["evictions"]])
    return rows


def live_tables(ctx: AppContext) -> tuple[list[list], list[list], list[list]]:
    """What the tab refreshes every 2 s: loaded models (one loaded from another tab shows up by
    itself), each scheduler and each prefix cache."""
    return models_table(ctx), serving_table(ctx), cache_table(ctx)


KERNELS_CHECK_TIMEOUT_S = 300.0


def kernels_check_report() -> dict:
    """The report of `python -m kernels_check --json` (environment, kernel packages, per-op paths,
    fused-vs-reference checks; no benchmark), run as the command-line tool it is: the app does not
    import the diagnostics package, and a crash or hang there cannot take the server down."""
    root = Path(__file__).resolve().parents[2]  # app.py's folder, where kernels_check/ sits
    if not (root / "kernels_check").is_dir():
        return {"available": False, "why": f"kernels_check is not installed next to the app ({root})"}
    try:
        done = subprocess.run([sys.executable, "-m", "kernels_check", "--json"], check=False, cwd=root,
                              capture_output=True,
                              text=True, timeout=KERNELS_CHECK_TIMEOUT_S)
        return json.loads(done.stdout)
    except subprocess.TimeoutExpired:
        return {"available": True, "error": f"kernels_check took more than {KERNELS_CHECK_TIMEOUT_S:.0f} s"}
    except json.JSONDecodeError:  # a diagnostics failure must not take the tab down
        log.error("kernels_check failed: %s", done.stderr[-2000:])
        return {"available": True, "error": f"kernels_check exited {done.returncode}: {done.stderr[-500:]}"}


def _md(title: str, d: dict[str, str]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in d.items())
    return f"#### {title}\n| | |\n|---|---|\n{rows}"


@user_errors
def system_report(ctx: AppContext) -> tuple[str, list[list[str]], dict]:
    """(machine + versions markdown, loaded-models rows, session-cache stats)."""
    text = _md("Machine", machine(ctx)) + "\n\n" + _md("Versions", versions())
    return text, models_table(ctx), ctx.store.stats()


def build_system_tab(ctx: AppContext) -> list:
    """Lays out the tab; returns the outputs of system_report (build_demo also fills them on load)."""
    with gr.Row():
        refresh = gr.Button("Refresh", variant="secondary")
        run_check = gr.Button("Run kernels_check report")
    info = gr.Markdown()
    models = gr.Dataframe(
        headers=["model", "device", "weights", "load time", "kernel path per op", "why this path", "notes"],
        value=models_table(ctx),
        label="Loaded models (refreshes every 2 s)",
        interactive=False,
        wrap=True,
    )
    serving = gr.Dataframe(
        value=serving_table(ctx),
        headers=SERVING_HEADERS,
        label="Serving now: each model's batched scheduler (refreshes every 2 s)",
        interactive=False,
    )
    caches = gr.Dataframe(
        value=cache_table(ctx),
        headers=CACHE_HEADERS,
        label="Prefix-state cache of each model (refreshes every 2 s)",
        interactive=False,
    )
    gr.Timer(2.0).tick(bind(live_tables, ctx), None, [models, serving, caches], api_name="serving", queue=False)
    with gr.Row():
        stats = gr.JSON(label="Session cache (all sessions)")
        check = gr.JSON(label="kernels_check report")
    refresh.click(bind(system_report, ctx), None, [info, models, stats], api_name="system")
    run_check.click(user_errors(kernels_check_report), None, check, api_name="kernels_check")
    return [info, models, stats]
