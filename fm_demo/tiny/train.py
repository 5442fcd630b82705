"""Train a tiny Falcon Mamba checkpoint on the CPU: python -m fm_demo.tiny.train --variant instruct --out DIR

Seeded end to end (weights, data stream, step count), so the same command gives the same weights
on the same torch build. The forward pass is the engine's own `model_forward` (the code that
serves the model), with the cache-friendly training scan of `scan.py`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import STEPS, TinyDims, TrainConfig, falcon_mamba_config
from .corpus import base_rows, batches, instruct_rows


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over scored targets. logits [B, T, V]; targets, mask [B, T]."""
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # [B*T]
    m = mask.flatten()
    return (nll * m).sum() / m.sum().clamp_min(1)


def build_model(dims: TinyDims, variant: str, seed: int):
    from transformers import FalconMambaForCausalLM

    torch.manual_seed(seed)
    return FalconMambaForCausalLM(falcon_mamba_config(dims, variant))


def train(cfg: TrainConfig, dims: TinyDims, out: Path, tok, init_from: Path | None = None) -> dict:
    """Run the training loop and save the checkpoint to `out`; returns a summary dict."""
    from fm_demo.engine.mixer import model_forward

    from .scan import training_ops

    torch.set_num_threads(cfg.threads)
    previous = None
    if init_from is not None:  # continue (e.g. a low-lr cool-down after a run stopped by the time cap)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)
        previous = json.loads((init_from / "training.json").read_text())
    else:
        model = build_model(dims, cfg.variant, cfg.seed)
    model.train()
    ops = training_ops()
    core_rows = 0 if init_from is not None else cfg.core_steps * cfg.batch_size  # a continued run is past it
    rows = (instruct_rows(tok, cfg.seed + 1, cfg.seq_len, core_rows=core_rows, framed=cfg.framed)
            if cfg.variant == "instruct"
            else base_rows(tok, cfg.seed + 1, cfg.seq_len))
    data = batches(rows, cfg.batch_size)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "A_log" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "A_log" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    t0, losses, step = time.time(), [], 0
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        ids, mask = next(data)  # [B, T+1]
        logits = model_forward(model, ids[:, :-1], ops=ops)  # [B, T, V]
        loss = masked_loss(logits, ids[:, 1:], mask[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        elapsed = time.time() - t0
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
            print(f"step {step} loss {recent:.4f} lr {lr_at(step, cfg):.2e} {elapsed / 60:.1f} min", flush=True)
        if cfg.stop_after and step + 1 >= cfg.stop_after:
            break
        if elapsed > cfg.max_minutes * 60:
            print(f"stopping at step {step}: time cap of {cfg.max_minutes} min reached", flush=True)
            break
    summary = {"steps_done": step + 1, "train_minutes": round((time.time() - t0) / 60, 1),
               "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
               "train_config": asdict(cfg), "dims": asdict(dims)}
    if previous is not None:
        summary["continued_from"] = previous
    save_checkpoint(model, tok, cfg.variant, out, summary)
    return summary


def save_checkpoint(model, tok, variant: str, out: Path, summary: dict) -> None:
    """config.json, model.safetensors (fp16), generation_config.json, tokenizer files, training.json.

    The weights are stored in fp16, half the bytes of fp32 in the package and in git history;
    config.json keeps dtype float32, so from_pretrained casts them back and the model computes
    in fp32 as it was trained (evaluate.py measures the stored weights).
    """
    from .tokenizer import save_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config = generation_config(model.config, variant)
    half = {name: t.detach().to(torch.float16) for name, t in model.state_dict().items()}
    model.save_pretrained(str(out), state_dict=half, safe_serialization=True)
    save_tokenizer(tok, out, variant)
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")


def generation_config(config, variant: str):
    """Greedy by default; instruct stops at <|im_end|> (end of reply) or <|endoftext|>."""
    from transformers import GenerationConfig

    from .tokenizer import EOT_ID, IM_END_ID

    eos = [IM_END_ID, EOT_ID] if variant == "instruct" else EOT_ID
    return GenerationConfig(bos_token_id=EOT_ID, eos_token_id=eos, pad_token_id=EOT_ID,
                            do_sample=False, max_new_tokens=64)


def main() -> None:
    import argparse

    from .tokenizer import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--variant", choices=("base", "instruct"), required=True)
    p.add_argument("--out", type=Path, required=True)
    defaults = TrainConfig()
    p.add_argument("--init-from", type=Path, help="continue from this checkpoint instead of a fresh init")
    for name in ("seed", "steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup", "max_minutes",
                 "threads", "framed", "core_steps", "stop_after"):
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(defaults, name)),
                       default=getattr(defaults, name))
    p.set_defaults(steps=None)  # per variant, from STEPS
    a = p.parse_args()
    if a.steps is None:
        a.steps = STEPS[a.variant]
    cfg = TrainConfig(variant=a.variant, seed=a.seed, steps=a.steps, batch_size=a.batch_size,
                      seq_len=a.seq_len, lr=a.lr, min_lr_ratio=a.min_lr_ratio, warmup=a.warmup,
                      max_minutes=a.max_minutes, threads=a.threads, framed=a.framed, core_steps=a.core_steps,
                      stop_after=a.stop_after)
    summary = train(cfg, TinyDims(), a.out, load_tokenizer(), a.init_from)
    print(json.dumps({k: v for k, v in summary.items() if k != "train_config"}))


if __name__ == "__main__":
    main()
