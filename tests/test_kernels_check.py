"""python -m kernels_check: the report runs, its JSON has the documented fields, and it fails when
it should. Run on this machine as a user would run it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fm_demo.engine import REFERENCE, Engine, OpSet, ops
from kernels_check import checks, env, model_check, models, report
from kernels_check.bench import run_bench

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
ROW_KEYS = {"op", "impl", "against", "shape", "dtype", "max_abs", "max_rel", "atol", "rtol", "status", "reason"}


@pytest.fixture(scope="module")
def cli_report() -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "-m", "kernels_check", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    return proc, json.loads(proc.stdout)


def test_json_report_has_the_documented_fields(cli_report):
    proc, rep = cli_report
    assert set(rep) == {"schema", "environment", "packages", "engine_paths", "checks", "model_check", "bench",
                        "verdict", "exit_code", "elapsed_s"}
    assert rep["schema"] == 1 and rep["bench"] is None
    assert {"python", "platform", "torch", "torch_cuda", "cuda_available", "gpu"} <= set(rep["environment"])
    for dist in ("mamba-ssm", "causal-conv1d", "triton", "transformers", "kernels", "bitsandbytes"):
        assert {"installed", "importable", "version", "error"} <= set(rep["packages"][dist]), dist
    assert "backend" in rep["packages"]["bitsandbytes"]
    assert {"kernels_package", "available", "hub_repo"} <= set(rep["packages"]["transformers_kernel_hub"])
    assert {"device", "conv", "conv_update", "scan", "state_update", "fused", "reason"} <= set(rep["engine_paths"])
    rows = rep["checks"] + rep["model_check"]["results"]
    assert rows and all(set(r) == ROW_KEYS for r in rows)
    assert all(r["status"] in ("ok", "fail", "skipped") for r in rows)
    assert proc.returncode == rep["exit_code"]


@pytest.mark.skipif(CUDA, reason="checks the no-CUDA report")
def test_without_cuda_it_exits_0_and_says_the_reference_path_is_in_use(cli_report):
    proc, rep = cli_report
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rep["verdict"].startswith("reference path in use: no CUDA device")
    assert rep["environment"]["cuda_available"] is False and rep["environment"]["gpu"] is None
    assert rep["engine_paths"]["fused"] is False
    assert all(rep["engine_paths"][op] == "reference" for op in ("conv", "conv_update", "scan", "state_update"))
    fused_rows = [r for r in rep["checks"] if r["impl"] in ("fused", "cuda_graph")]
    assert fused_rows and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in fused_rows)
    # the reference path is still verified: against transformers' slow path and across chunkings
    ref_rows = [r for r in rep["checks"] if r["against"] == "transformers slow path"]
    assert {r["op"] for r in ref_rows} == {"conv", "conv_update", "scan", "state_update"}
    assert all(r["status"] == "ok" and r["max_abs"] <= r["atol"] + r["rtol"] for r in ref_rows)
    model_rows = [r for r in rep["model_check"]["results"] if r["status"] != "skipped"]
    assert {r["shape"]["chunk"] for r in model_rows} >= {1, 7, 16}
    assert rep["model_check"]["status"] == "ok"


def test_text_report_lists_packages_checks_and_verdict(cli_report):
    _, rep = cli_report
    text = report.format_text(rep)
    assert "causal-conv1d:" in text and "mamba-ssm:" in text and "bitsandbytes:" in text
    assert text.count(" | ") >= len(rep["checks"]) and text.rstrip().endswith(rep["verdict"])


def test_a_wrong_fused_op_fails_its_check_and_the_exit_code():
    """A 'fused' scan that ignores the initial state (the classic bug) must be caught."""
    def scan_ignoring_h0(u, delta, A, B, C, D, z, h0):
        return ops.selective_scan_ref(u, delta, A, B, C, D, z, torch.zeros_like(h0))

    bad = OpSet(ops.causal_conv1d_ref, ops.causal_conv1d_update_ref, scan_ignoring_h0,
                ops.selective_state_update_ref, paths={**REFERENCE.paths, "scan": "fused: broken"})
    small = {"scan": ({"B": 1, "D": 32, "T": 12, "N": 8, "K": 4},)}
    rows = checks.fused_op_checks(bad, "cpu", dtypes=(torch.float32,), shapes=small)
    scan_rows = [r for r in rows if r["op"] == "scan"]
    assert [r["status"] for r in scan_rows] == ["fail"] and scan_rows[0]["max_abs"] > 1e-2
    rep = {"checks": rows, "model_check": {"results": []}, "engine_paths": {**REFERENCE.paths, "reason": ""},
           "environment": {"cuda_available": True}}
    text, code = report.verdict(rep)
    assert code == 1 and text.startswith("FAIL") and "scan" in text


def test_a_correct_fused_op_passes():
    good = OpSet(ops.causal_conv1d_ref, ops.causal_conv1d_update_ref, ops.selective_scan_ref,
                 ops.selective_state_update_ref, paths={**REFERENCE.paths, "conv_update": "fused: same as ref"})
    rows = checks.fused_op_checks(good, "cpu", dtypes=(torch.float32, torch.bfloat16),
                                  shapes={"conv_update": ({"B": 2, "D": 64, "N": 16, "K": 4},)})
    assert [r["status"] for r in rows if r["op"] == "conv_update"] == ["ok", "ok"]


def test_compare_catches_mismatch_nan_and_shape():
    want = {"y": torch.ones(4)}
    assert checks.compare({"y": torch.ones(4)}, want, 1e-6, 0)["ok"]
    assert not checks.compare({"y": torch.ones(4) + 1e-3}, want, 1e-6, 1e-6)["ok"]
    assert not checks.compare({"y": torch.tensor([1.0, 1.0, 1.0, float("nan")])}, want, 1.0, 1.0)["ok"]
    assert not checks.compare({"y": torch.ones(5)}, want, 1.0, 1.0)["ok"]


def test_bench_without_cuda_says_so():
    if CUDA:
        pytest.skip("checks the no-CUDA bench")
    assert "no CUDA" in run_bench(None, {})["skipped"]


@pytest.mark.parametrize("name,tb_s", [("NVIDIA H200", 4.8), ("NVIDIA H100 80GB HBM3", 3.35),
                                       ("NVIDIA H100 PCIe", 2.0), ("NVIDIA A100-SXM4-80GB", 2.0),
                                       ("NVIDIA A10G", 0.6), ("NVIDIA L40S", 0.864), ("NVIDIA L4", 0.3),
                                       ("Tesla T4", 0.32), ("Some New GPU", None)])
def test_hbm_bandwidth_table(name, tb_s):
    assert env.hbm_bandwidth_tb_s(name) == tb_s


def test_7b_shape_on_meta_reads_about_14_gb_per_token():
    """Per-layer bytes from 2- and 3-layer meta models of the 7B's width, extrapolated to its 64
    layers (building all 64 on meta takes seconds of Python)."""
    from transformers import FalconMambaForCausalLM

    cfg = models.config_7b()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (4096, 8192, 64)
    sizes = []
    for layers in (2, 3):
        cfg.num_hidden_layers = layers
        with torch.device("meta"):
            sizes.append(models.bytes_read_per_token(FalconMambaForCausalLM(cfg).to(torch.bfloat16)))
    total = sizes[0] + 62 * (sizes[1] - sizes[0])
    assert 13.9e9 < total < 14.1e9


def test_random_model_built_via_meta_runs_like_transformers():
    model = model_check.tiny_random("cpu", torch.float32)
    assert all(not p.is_meta and torch.isfinite(p).all() for p in model.parameters())
    ids = torch.randint(0, 512, (1, 20))
    engine = Engine(model, chunk_size=8)
    logits = engine.prefill(ids, engine.new_state(), all_logits=True)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits.float(), atol=1e-4, rtol=1e-4)


def test_nf4_quantization_in_place_shrinks_the_weights_and_still_runs():
    pytest.importorskip("bitsandbytes")
    model = model_check.tiny_random("cpu", torch.bfloat16)
    before = models.bytes_read_per_token(model)
    models.quantize_4bit_(model)
    assert type(model.backbone.layers[0].mixer.in_proj).__name__ == "Linear4bit"
    assert models.bytes_read_per_token(model) < 0.7 * before
    engine = Engine(model)
    state = engine.new_state()
    assert torch.isfinite(engine.prefill(torch.randint(0, 512, (1, 9)), state)).all()
    assert torch.isfinite(engine.step(torch.tensor([3]), state)).all()


def test_environment_report_for_the_app_is_cheap_and_names_the_path():
    import kernels_check

    rep = kernels_check.environment_report()
    assert set(rep) == {"environment", "packages", "engine_paths", "summary"}
    want = "fused kernels in use" if rep["engine_paths"]["fused"] else "reference path in use"
    assert rep["summary"].startswith(want) and "python -m kernels_check" in rep["summary"]
