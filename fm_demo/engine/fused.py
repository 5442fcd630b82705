"""Fused CUDA twins of the reference ops (mamba-ssm, causal-conv1d), loaded only where they import."""

from __future__ import annotations

from .kernels import OpSet


def load() -> tuple[OpSet | None, str]:
    """(fused op set, "") or (None, why the reference path runs instead)."""
    try:
        import causal_conv1d  # noqa: F401
        import mamba_ssm  # noqa: F401  (needs its compiled CUDA extension)
    except Exception as e:  # ImportError, or OSError/RuntimeError from a broken CUDA build
        return None, f"fused kernels not importable: {type(e).__name__}: {e}"
    return None, "fused wrappers are not available in this build"
