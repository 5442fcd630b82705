"""The Hugging Face Space hardware flavors: what the System tab says the app runs on, and what a
Spacefile may ask for (deploy/manifest.py validates against this table)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    flavor: str  # the Hub's name, as in huggingface_hub.SpaceHardware
    kind: str  # "cpu" | "gpu" | "zerogpu"
    label: str
    bf16: bool = False  # native bfloat16 (compute capability >= 8.0)
    free: bool = False  # free hardware has a fixed sleep time


_GPU = "gpu"
HARDWARE: dict[str, Hardware] = {h.flavor: h for h in (
    Hardware("cpu-basic", "cpu", "2 vCPU, 16 GB RAM", free=True),
    Hardware("cpu-upgrade", "cpu", "8 vCPU, 32 GB RAM"),
    Hardware("zero-a10g", "zerogpu", "ZeroGPU (H200 slice, 70 GB, allocated per call)", bf16=True, free=True),
    Hardware("t4-small", _GPU, "NVIDIA T4 16 GB"),
    Hardware("t4-medium", _GPU, "NVIDIA T4 16 GB"),
    Hardware("l4x1", _GPU, "NVIDIA L4 24 GB", bf16=True),
    Hardware("l4x4", _GPU, "4x NVIDIA L4 24 GB", bf16=True),
    Hardware("l40sx1", _GPU, "NVIDIA L40S 48 GB", bf16=True),
    Hardware("a10g-small", _GPU, "NVIDIA A10G 24 GB", bf16=True),
    Hardware("a10g-large", _GPU, "NVIDIA A10G 24 GB", bf16=True),
    Hardware("a10g-largex2", _GPU, "2x NVIDIA A10G 24 GB", bf16=True),
    Hardware("a100-large", _GPU, "NVIDIA A100 80 GB", bf16=True),
    Hardware("h100", _GPU, "NVIDIA H100 80 GB", bf16=True),
)}
HARDWARE_ALIASES = {"zerogpu": "zero-a10g", "zero-gpu": "zero-a10g"}  # the Hub's flavor name is historical
