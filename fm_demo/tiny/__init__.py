"""Bundled tiny Falcon Mamba checkpoints (base and instruct) and the code that makes them.

They are real `falcon_mamba` models in the Hugging Face format, loaded through the same
`from_pretrained` path as tiiuae/falcon-mamba-7b, so the app runs and is tested end to end on a
machine without a GPU or network. They are demo-size models, not TII's Falcon Mamba.
"""

from __future__ import annotations

from pathlib import Path

VARIANTS = ("base", "instruct")
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


def checkpoint_path(variant: str) -> Path:
    """Folder of the bundled checkpoint `variant` ("base" or "instruct")."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return CHECKPOINT_DIR / f"falcon-mamba-tiny-{variant}"
