"""Model dimensions and training settings of the tiny checkpoints (one source of defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .tokenizer import EOT_ID, IM_END_ID, VOCAB_SIZE


@dataclass(frozen=True)
class TinyDims:
    """Falcon Mamba at demo size. Every Linear has in_features % 64 == 0 and out_features % 32 == 0,
    which bitsandbytes' 4-bit CPU path needs: in_proj 256->1024, x_proj 512->96 (R + 2N),
    dt_proj 64->512, out_proj 512->256, lm_head 256->2048."""

    vocab_size: int = VOCAB_SIZE
    hidden_size: int = 256
    intermediate_size: int = 512
    state_size: int = 16
    num_hidden_layers: int = 4
    conv_kernel: int = 4
    time_step_rank: int = 64


# Steps of the bundled checkpoints; base learns plain text quickly (more steps memorise templates).
STEPS = {"instruct": 1400, "base": 300}


@dataclass(frozen=True)
class TrainConfig:
    variant: str = "instruct"
    seed: int = 0
    steps: int = STEPS["instruct"]
    batch_size: int = 16
    seq_len: int = 160
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_minutes: float = 600.0  # safety cap; a run that hits it says so in its log and model card.
    # Far above a normal run: where it stops depends on the machine's load, so a run it stops
    # is no longer reproduced by the bare command.
    threads: int = 1  # measured fastest on the 2-core dev machine (2 threads contend)
    log_every: int = 20
    framed: float = 0.0  # instruct: share of requests composed from parts (wordings.framed); 0 in stage 1
    core_steps: int = 500  # instruct: steps of the first stage (plain wordings, nothing declined)
    stop_after: int = 0  # end after this many steps without changing the lr schedule (0: run all);
    # replays a run that the time cap stopped early


def falcon_mamba_config(dims: TinyDims, variant: str):
    """A transformers FalconMambaConfig; eos is <|im_end|> for instruct, <|endoftext|> for base."""
    from transformers import FalconMambaConfig

    return FalconMambaConfig(
        **asdict(dims), use_bias=False, use_conv_bias=True, residual_in_fp32=True,
        tie_word_embeddings=False, bos_token_id=EOT_ID, pad_token_id=EOT_ID,
        eos_token_id=IM_END_ID if variant == "instruct" else EOT_ID,
        architectures=["FalconMambaForCausalLM"],
    )
