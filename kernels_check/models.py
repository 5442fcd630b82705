"""Random-weight Falcon Mamba models of any shape, built without a download or a double allocation.

The model is constructed on the 'meta' device (no memory), cast, materialised once on the target
device with `to_empty`, and initialised in place, so a 7B-shaped bf16 model costs its 14.5 GB once.
The values follow transformers' FalconMamba initialisation in spirit (S4D-real A, D = 1, dt bias
drawn log-uniformly in [dt_min, dt_max] through an inverse softplus), which keeps the recurrence
as stable as a trained model's; the numbers themselves are irrelevant to speed and equivalence.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

# The published tiiuae/falcon-mamba-7b config (the instruct model shares the architecture)
CONFIG_7B = Path(__file__).resolve().parent / "falcon-mamba-7b.config.json"


def config_7b(path: Path = CONFIG_7B):
    from transformers import FalconMambaConfig

    fields = json.loads(path.read_text())
    fields.pop("architectures", None)
    fields.pop("torch_dtype", None)
    return FalconMambaConfig(**fields)


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Initialise every parameter and buffer in place on its own device."""
    cfg = model.config
    gen = torch.Generator(device=model.backbone.embeddings.weight.device).manual_seed(seed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.dtype.is_floating_point:
            continue
        if name.endswith("A_log"):
            t.copy_(torch.log(torch.arange(1, t.shape[-1] + 1, dtype=torch.float32)).expand(t.shape))
        elif name.endswith("mixer.D") or "norm" in name:
            t.fill_(1.0)
        elif name.endswith("dt_proj.bias"):
            u = torch.rand(t.shape, generator=gen, device=t.device, dtype=torch.float32)
            dt = torch.exp(u * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min))
                           + math.log(cfg.time_step_min)).clamp(min=cfg.time_step_floor)
            t.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif name.endswith("bias"):
            t.zero_()
        else:  # weights: fan-in scaled normal; conv1d weight [D, 1, K] has fan-in K
            fan_in = t.shape[-1] if t.ndim > 1 else 1
            t.copy_(torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float32) / math.sqrt(fan_in))
    return model


def build_random_model(config, device: str | torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A FalconMambaForCausalLM of `config`'s shape with random weights, allocated once on `device`."""
    from transformers import FalconMambaForCausalLM

    with torch.device("meta"):
        model = FalconMambaForCausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # to_empty gives lm_head a tensor of its own: tie it to the embeddings again
    return init_random_(model, seed).eval()


def quantize_4bit_(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every nn.Linear inside the backbone's layers with a bitsandbytes NF4 Linear4bit, one
    at a time (peak memory: the model plus one layer). lm_head stays in its dtype, as transformers'
    bitsandbytes loading keeps it."""
    import bitsandbytes as bnb

    for layer in model.backbone.layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             module=q).to(child.weight.device)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, child_name, q)
    return model


def bytes_read_per_token(model: nn.Module) -> int:
    """Bytes of weights a batch-1 decode step reads: every parameter/buffer once, except the
    embedding table, of which it reads one row. 4-bit weights count their packed bytes plus
    their quantisation statistics."""
    emb = model.backbone.embeddings.weight
    total = 0
    for t in [*model.parameters(), *model.buffers()]:  # both iterators skip shared tensors
        if t is emb:
            continue
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
            if getattr(qs, "state2", None) is not None:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    return total + emb.shape[1] * emb.element_size()


@torch.no_grad()
def confine_head_(model: nn.Module, vocab_used: int, silenced: Iterable[int] = ()) -> nn.Module:
    """Zero lm_head's rows of ids >= vocab_used and of `silenced` ids, in place.

    Random weights paired with a smaller tokenizer than the config's vocab (the 7B's 65,024 rows,
    a demo tokenizer's few thousand ids): a zero row's logit is 0, below the best of thousands of
    random logits, so greedy decoding only picks ids the tokenizer can write and never a silenced
    one (the stop tokens: every reply then runs its full length). The shapes stay the config's.
    """
    head = model.get_output_embeddings().weight
    if model.config.tie_word_embeddings:  # a zero row would also silence these ids as inputs
        model.lm_head.weight = nn.Parameter(head.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        head = model.lm_head.weight
    head[vocab_used:] = 0
    head[sorted(set(silenced))] = 0
    return model
