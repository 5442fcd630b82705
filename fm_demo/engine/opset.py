"""OpSet: the four mixer ops the engine calls, and the pure-torch reference set.

Every op has the same signature in every set (see ops.py for shapes). kernels.py chooses a set for
a device; fused.py builds the fused one. Both import from here, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import ops

OP_NAMES = ("conv", "conv_update", "scan", "state_update")


@dataclass(frozen=True)
class OpSet:
    conv: Callable
    conv_update: Callable
    scan: Callable
    state_update: Callable
    paths: dict[str, str] = field(default_factory=dict)  # op name -> "reference" | "fused: <lib>"
    reason: str = ""  # why this set was chosen

    @property
    def fused(self) -> bool:
        return any(p != "reference" for p in self.paths.values())

    def op(self, name: str) -> Callable:
        return getattr(self, name)


REFERENCE = OpSet(
    conv=ops.causal_conv1d_ref,
    conv_update=ops.causal_conv1d_update_ref,
    scan=ops.selective_scan_ref,
    state_update=ops.selective_state_update_ref,
    paths={name: "reference" for name in OP_NAMES},
    reason="pure-torch reference ops",
)
