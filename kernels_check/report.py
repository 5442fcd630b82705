"""Assemble the kernels_check report (schema in __init__.py), its verdict, and its text form."""

from __future__ import annotations

import time

import torch

from fm_demo.engine import OpSet, select_ops

from . import checks, env, model_check

SCHEMA_VERSION = 1


def _fused_or_why() -> tuple[OpSet | None, str]:
    """The fused op set to check (regardless of FM_DEMO_FORCE_REFERENCE), or why there is none."""
    if not torch.cuda.is_available():
        return None, "no CUDA device: the reference path is in use"
    from fm_demo.engine import fused

    return fused.load()


def engine_paths(device: str) -> dict:
    opset = select_ops(device)
    return {"device": device, **opset.paths, "fused": opset.fused, "reason": opset.reason}


def verdict(report: dict) -> tuple[str, int]:
    rows = report["checks"] + report["model_check"]["results"]
    failed = [r for r in rows if r["status"] == "fail"]
    if failed:
        names = sorted({f"{r['op']} ({r['impl']} vs {r['against']})" for r in failed})
        return (f"FAIL: {len(failed)} check(s) failed: {', '.join(names)}. The numbers on this machine are "
                "wrong; set FM_DEMO_FORCE_REFERENCE=1 to serve with the reference ops."), 1
    paths = report["engine_paths"]
    if not report["environment"]["cuda_available"]:
        return ("reference path in use: no CUDA device (fused kernels need one). The reference ops match "
                "transformers' slow path and give the same logits in every chunking."), 0
    fused = [op for op in checks.OP_NAMES if paths.get(op, "reference") != "reference"]
    if not fused:
        return f"reference path in use on CUDA: {paths['reason']}", 0
    rest = [op for op in checks.OP_NAMES if op not in fused]
    tail = f"; reference for {', '.join(rest)} ({paths['reason']})" if rest else ""
    return f"fused kernels in use and verified for {', '.join(fused)}{tail}", 0


def environment_report() -> dict:
    """The cheap part, for the app's system tab: environment, packages and the engine's op paths,
    without running checks (those take seconds to minutes: `python -m kernels_check`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = engine_paths(device)
    if paths["fused"]:
        summary = "fused kernels in use: " + ", ".join(op for op in checks.OP_NAMES if paths[op] != "reference")
    else:
        summary = f"reference path in use: {paths['reason']}"
    return {"environment": env.environment(), "packages": env.packages(), "engine_paths": paths,
            "summary": summary + " (verify with: python -m kernels_check)"}


def build_report(bench: bool = False) -> dict:
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pkgs = env.packages()
    fused, why_not = _fused_or_why()
    report = {"schema": SCHEMA_VERSION, "environment": env.environment(), "packages": pkgs,
              "engine_paths": engine_paths(device)}
    rows = checks.reference_checks(device)
    rows += checks.fused_op_checks(fused, device, why_not)
    rows += model_check.decode_step_checks(device, fused, why_not)
    rows += model_check.graph_check(device)
    report["checks"] = rows
    report["model_check"] = model_check.model_check(device, fused, why_not)
    if bench:
        from .bench import run_bench

        report["bench"] = run_bench(fused, pkgs)
    else:
        report["bench"] = None
    report["verdict"], report["exit_code"] = verdict(report)
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return report


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _format_bench(bench: dict | None) -> list[str]:
    if bench is None:
        return []
    if "skipped" in bench:
        return [f"bench: skipped ({bench['skipped']})"]
    lines = ["bench, per op at the 7B's shapes, bf16 (reference ms -> fused ms, speedup):"]
    for r in bench["ops"]:
        fused = f"{r['fused_ms']} ms, x{r['speedup']}" if r["fused_ms"] is not None else "no fused kernel"
        lines.append(f"  {r['op']}: {r['reference_ms']} ms -> {fused} [{r['impl']}]")
    d = bench["decode_7b"]
    lines.append(f"bench, batch-1 decode of the 7B shape (built in {d['build_s']} s, {d['gpu_memory_gib']} GiB):")
    for label in ("bf16", "nf4"):
        part = d.get(label, {})
        if "skipped" in part:
            lines.append(f"  {label}: skipped ({part['skipped']})")
            continue
        lines.append(f"  {label}: {part['bytes_per_token'] / 1e9:.2f} GB/token at {part['bandwidth_tb_s']} TB/s "
                     f"-> bound {part['bound_tok_s']} tok/s")
        for r in part["runs"]:
            lines.append(f"    ops={r['ops']} graph={r['cuda_graph']}: {r['tok_s']} tok/s, {r['ms_per_token']} "
                         f"ms/token, {r['fraction_of_bound']} of bound")
    return lines


def format_text(report: dict) -> str:
    e, lines = report["environment"], []
    gpu = e["gpu"]
    lines.append(f"torch {e['torch']} (CUDA {e['torch_cuda']}), python {e['python']}")
    lines.append(f"GPU: {gpu['name']} sm_{gpu['capability']} {gpu['memory_gib']} GiB, "
                 f"HBM {gpu['hbm_tb_s']} TB/s" if gpu else "GPU: none")
    for name, p in report["packages"].items():
        if name == "transformers_kernel_hub":
            lines.append(f"  transformers kernel hub: available={p['available']} (kernels {p['kernels_package']})")
            continue
        state = p["version"] if p["importable"] else ("broken: " + str(p["error"]) if p["installed"] else "missing")
        extra = f", backend {p['backend']}" if p.get("backend") else ""
        lines.append(f"  {name}: {state}{extra}")
    lines.append("engine paths: " + ", ".join(f"{k}={v}" for k, v in report["engine_paths"].items()))
    lines.append("checks (op | impl vs against | shape | dtype | max_abs | max_rel | atol | rtol | status):")
    for r in report["checks"] + report["model_check"]["results"]:
        lines.append(f"  {r['op']} | {r['impl']} vs {r['against']} | {r['shape']} | {r['dtype']} | "
                     f"{_fmt(r['max_abs'])} | {_fmt(r['max_rel'])} | {r['atol']} | {r['rtol']} | {r['status']}"
                     + (f" ({r['reason']})" if r["reason"] else ""))
    lines += _format_bench(report["bench"])
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)
