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
    which the trained models (short, exact answers) never do. The logits of its stop tokens are
    always 0, below the best of the others, so greedy decoding never ends a reply by itself."""
    from transformers import AutoTokenizer, FalconMambaForCausalLM

    from fm_demo.tiny.config import TinyDims, falcon_mamba_config
    from fm_demo.tiny.tokenizer import load_tokenizer, save_tokenizer

    out = tmp_path_factory.mktemp(f"random-tiny-{kind}")
    save_tokenizer(load_tokenizer(), out, kind)
    torch.manual_seed(0 if kind == "instruct" else 1)
    model = FalconMambaForCausalLM(falcon_mamba_config(TinyDims(), kind))
    tok = AutoTokenizer.from_pretrained(out)
    stops = {tok.eos_token_id, *tok.convert_tokens_to_ids(["<|im_end|>"])} - {None, tok.unk_token_id}
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        if model.config.tie_word_embeddings:  # zero rows would also silence these tokens as inputs
            model.lm_head.weight = torch.nn.Parameter(head.detach().clone())
            model.config.tie_word_embeddings = False
        model.lm_head.weight[sorted(stops)] = 0
    model.save_pretrained(out)
    return str(out)
