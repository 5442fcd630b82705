"""python -m kernels_check [--json] [--bench]: do the fused kernels run here, and are they right?

Reports the environment, the kernel packages, which implementation the engine uses for each op,
and checks every fused op against its pure-torch `_ref` twin (and the `_ref` ops against
transformers' slow path). Exit status 1 when any check fails, 0 otherwise; on a machine without
CUDA it says that the reference path is in use and exits 0.

JSON report (schema 1):
    schema        1
    environment   {python, platform, torch, torch_cuda, cuda_available,
                   gpu: null | {name, capability, memory_gib, count, multiprocessors, hbm_tb_s}}
    packages      {mamba-ssm, causal-conv1d, triton, einops, transformers, kernels, bitsandbytes:
                      {installed, importable, version, error} (bitsandbytes also: backend),
                   transformers_kernel_hub: {kernels_package, available, hub_repo}}
    engine_paths  {device, conv, conv_update, scan, state_update: "reference" | "fused: <lib> <version> ...",
                   fused: bool, reason}   -- what Engine(model) on this machine's device would run
    checks        [{op, impl, against, shape, dtype, max_abs, max_rel, atol, rtol, status, reason}]
                  op: conv | conv_update | scan | state_update | decode_step;
                  against: "reference" (fused vs `_ref`), "transformers slow path", "eager step"
                  (CUDA graph vs eager); status: ok | fail | skipped (reason says why);
                  max_rel = max_abs / max|want|; ok <=> max_abs <= atol + rtol * max|want|
    model_check   {config, status, results: [rows as in checks, op "model"]}: engine logits of a random
                  Falcon Mamba (prefill in several chunkings + decode steps) vs the reference path in one
                  chunk, and the reference path vs transformers' forward (fp32)
    bench         null without --bench; {skipped: why} without CUDA; else
                  {ops: [{op, shape, dtype, impl, reference_ms, fused_ms, speedup}],
                   decode_7b: {model, build_s, gpu_memory_gib,
                               bf16 | nf4: {bytes_per_token, bandwidth_tb_s, bound_tok_s,
                                            runs: [{weights, ops, cuda_graph, ms_per_token, tok_s,
                                                    finite, fraction_of_bound}]} | {skipped}}}
    verdict       one sentence: which path runs and whether it is verified
    exit_code     0 | 1
    elapsed_s     seconds the report took

environment_report() returns the cheap part (environment, packages, engine_paths, summary) for
the app, without running any check.
"""

from .report import build_report, environment_report, format_text

__all__ = ["build_report", "environment_report", "format_text"]
