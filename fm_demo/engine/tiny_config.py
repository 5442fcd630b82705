"""Random-weight Falcon Mamba configs for tests and benchmarks (no download needed).

Defaults keep every Linear's in_features a multiple of 64 and out_features a multiple of 32, so
the same models also load in bitsandbytes 4-bit on CPU.
"""

from __future__ import annotations

import torch


def tiny_config(hidden_size: int = 64, num_hidden_layers: int = 2, state_size: int = 16,
                expand: int = 2, conv_kernel: int = 4, time_step_rank: int = 64,
                vocab_size: int = 512, **overrides):
    from transformers import FalconMambaConfig

    return FalconMambaConfig(
        hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, state_size=state_size,
        expand=expand, conv_kernel=conv_kernel, time_step_rank=time_step_rank,
        vocab_size=vocab_size, pad_token_id=0, bos_token_id=0, eos_token_id=1,
        use_cache=True, **overrides,
    )


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    """A randomly initialised FalconMambaForCausalLM in eval mode."""
    from transformers import FalconMambaForCausalLM

    torch.manual_seed(seed)
    model = FalconMambaForCausalLM(tiny_config(**config_overrides)).to(dtype)
    return model.eval()
