"""The checkpoints tests load: the bundled tiny models, and a random-weight model of their shape."""

from __future__ import annotations

from pathlib import Path

import torch

from fm_demo.settings import tiny_checkpoint


def bundled_checkpoint(kind: str) -> str:
    """Folder of the bundled tiny checkpoint `kind` ("base" | "instruct"); it ships with the code."""
    path = Path(tiny_checkpoint(kind))
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the bundled tiny {kind} checkpoint is missing at {path}")
    return str(path)


def random_checkpoint(kind: str, tmp_path_factory) -> str:
    """Random weights of the tiny shape with the tiny tokenizer: it rambles on for as long as asked,
    which the trained models (short, exact answers) never do."""
    from transformers import FalconMambaForCausalLM

    from fm_demo.tiny.config import TinyDims, falcon_mamba_config
    from fm_demo.tiny.tokenizer import load_tokenizer, save_tokenizer

    out = tmp_path_factory.mktemp(f"random-tiny-{kind}")
    save_tokenizer(load_tokenizer(), out, kind)
    torch.manual_seed(0 if kind == "instruct" else 1)
    FalconMambaForCausalLM(falcon_mamba_config(TinyDims(), kind)).save_pretrained(out)
    return str(out)
