"""Kernel dispatch: pure-torch reference ops always, fused CUDA ops where they import and apply.

Every op has the same signature in both sets (see ops.py for shapes; opset.py for the sets). The
choice is never silent:
`OpSet.paths` names the implementation of each op and `OpSet.reason` says why the reference path
runs when it does. Set FM_DEMO_FORCE_REFERENCE=1 to force the reference path.
"""

from __future__ import annotations

import os

import torch

from .opset import OP_NAMES, REFERENCE, OpSet

__all__ = ["OP_NAMES", "REFERENCE", "OpSet", "force_reference", "select_ops"]

def force_reference() -> bool:
    return os.environ.get("FM_DEMO_FORCE_REFERENCE", "").strip().lower() in ("1", "true", "yes")


def select_ops(device: torch.device | str) -> OpSet:
    """The fastest exact op set for tensors on `device`."""
    device = torch.device(device)
    if force_reference():
        return _with_reason(REFERENCE, "reference path forced by FM_DEMO_FORCE_REFERENCE")
    if device.type != "cuda":
        return _with_reason(REFERENCE, f"no fused kernels for device '{device.type}'")
    from . import fused

    fused_set, why = fused.load()
    if fused_set is None:
        return _with_reason(REFERENCE, why)
    return fused_set


def _with_reason(opset: OpSet, reason: str) -> OpSet:
    return OpSet(opset.conv, opset.conv_update, opset.scan, opset.state_update, dict(opset.paths), reason)
