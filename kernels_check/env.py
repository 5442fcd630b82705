"""What this machine has: torch/CUDA/GPU facts and the kernel-related packages."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import platform
from importlib import metadata

import torch

# HBM bandwidth in TB/s by GPU name; first matching substring wins (so "H100 PCIe" precedes
# "H100" and "L40S" precedes "L4"). Vendor datasheet figures.
HBM_TB_S: tuple[tuple[str, float], ...] = (
    ("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100", 2.0), ("A10G", 0.6),
    ("L40S", 0.864), ("L4", 0.3), ("T4", 0.32),
)

# (import name, distribution name) of the packages the fused path and the 4-bit path use
PACKAGES = (("mamba_ssm", "mamba-ssm"), ("causal_conv1d", "causal-conv1d"), ("triton", "triton"),
            ("einops", "einops"), ("transformers", "transformers"), ("kernels", "kernels"),
            ("bitsandbytes", "bitsandbytes"))


def hbm_bandwidth_tb_s(gpu_name: str) -> float | None:
    for key, tb_s in HBM_TB_S:
        if key.lower() in gpu_name.lower():
            return tb_s
    return None


def gpu_info() -> dict | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
            "multiprocessors": props.multi_processor_count,
            "hbm_tb_s": hbm_bandwidth_tb_s(props.name)}


def environment() -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "gpu": gpu_info()}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def probe_package(module: str, dist: str) -> dict:
    """installed (a distribution is present), importable (import succeeds), version, error.

    Imports run with their chatter captured: some packages print or log warnings on import.
    """
    info = {"installed": _version(dist) is not None, "version": _version(dist), "importable": False,
            "error": None}
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), _quiet_logging():
            mod = importlib.import_module(module)
        info["importable"] = True
        info["version"] = info["version"] or getattr(mod, "__version__", None)
    except Exception as e:  # ImportError, or OSError/RuntimeError from a broken native build
        info["error"] = f"{type(e).__name__}: {e}"[:300]
    return info


@contextlib.contextmanager
def _quiet_logging():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def bitsandbytes_backend(info: dict) -> str | None:
    """'CUDA', 'CPU', 'ROCm', 'XPU' ... as bitsandbytes reports its native library, if it imports."""
    if not info["importable"]:
        return None
    try:
        from bitsandbytes import cextension

        return str(getattr(cextension, "BNB_BACKEND", None) or type(cextension.lib).__name__)
    except Exception as e:
        return f"unknown ({type(e).__name__})"


def transformers_kernel_hub(info_kernels: dict) -> dict:
    """Whether transformers can fetch mamba kernels from the Hub (needs the `kernels` package and
    network at run time); when it can't and mamba-ssm is missing, it falls back to slow torch code."""
    try:
        from transformers.utils import is_kernels_available

        available = bool(is_kernels_available())
    except Exception:
        available = False
    return {"kernels_package": info_kernels["version"] if info_kernels["importable"] else None,
            "available": available, "hub_repo": "kernels-community/mamba-ssm"}


def packages() -> dict:
    out = {dist: probe_package(module, dist) for module, dist in PACKAGES}
    out["bitsandbytes"]["backend"] = bitsandbytes_backend(out["bitsandbytes"])
    out["transformers_kernel_hub"] = transformers_kernel_hub(out["kernels"])
    return out
