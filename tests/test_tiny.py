"""Bundled tiny checkpoints: loading, chat format, tokenizer, training scan and golden outputs."""

from __future__ import annotations

import random
import re

import pytest
import torch

from fm_demo.tiny import VARIANTS, checkpoint_path
from fm_demo.tiny.tokenizer import CHAT_TEMPLATE, EOT_ID, IM_END_ID, IM_START_ID, render_chat

MAX_BUNDLE_BYTES = 40 * 2**20


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return {v: (AutoModelForCausalLM.from_pretrained(checkpoint_path(v)).eval(),
                AutoTokenizer.from_pretrained(checkpoint_path(v))) for v in VARIANTS}


def test_checkpoint_folders_complete_and_small():
    total = 0
    for v in VARIANTS:
        folder = checkpoint_path(v)
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "README.md"):
            assert (folder / name).is_file(), f"{v}: missing {name}"
        total += sum(p.stat().st_size for p in folder.iterdir())
    assert total <= MAX_BUNDLE_BYTES


def test_load_with_auto_classes(loaded):
    from transformers import FalconMambaForCausalLM

    for v, (model, tok) in loaded.items():
        assert isinstance(model, FalconMambaForCausalLM)
        assert model.config.model_type == "falcon_mamba"
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):  # bitsandbytes 4-bit needs these multiples
                assert mod.in_features % 64 == 0 and mod.out_features % 32 == 0, name
        assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
            EOT_ID, IM_START_ID, IM_END_ID]


def test_instruct_stops_at_im_end(loaded):
    model, tok = loaded["instruct"]
    assert IM_END_ID in model.generation_config.eos_token_id
    assert tok.eos_token == "<|im_end|>"
    assert loaded["base"][1].eos_token == "<|endoftext|>"


def test_chat_template_renders_falcon_mamba_format(loaded):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 + 3?"}]
    want = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
            "<|im_start|>assistant\n")
    for _, tok in loaded.values():
        assert tok.chat_template == CHAT_TEMPLATE
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
        assert render_chat(msgs, add_generation_prompt=True) == want
        ids = tok(want, add_special_tokens=False)["input_ids"]
        assert ids[0] == IM_START_ID and ids.count(IM_END_ID) == 4


def test_tokenizer_round_trip_and_digits(loaded):
    tok = loaded["instruct"][1]
    for text in ("Once upon a time, a little fox named Leo lived in a forest.", "12 + 345 = 357.",
                 "n o g a r d", "Ünïcödé and emoji 🦅 survive bytes.", "  spaces\n\nand lines  "):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    digits = tok.convert_ids_to_tokens(tok("2026", add_special_tokens=False)["input_ids"])
    assert digits == ["2", "0", "2", "6"]


def test_dialogue_mask_encoding_matches_whole_text(loaded):
    from fm_demo.tiny.corpus import encode_dialogue
    from fm_demo.tiny.tasks import instruct_dialogue

    tok = loaded["instruct"][1]
    rng = random.Random(3)
    for _ in range(50):
        msgs = instruct_dialogue(rng)
        ids, mask = encode_dialogue(tok.backend_tokenizer, msgs)
        assert ids == tok(render_chat(msgs), add_special_tokens=False)["input_ids"]
        scored = tok.decode([i for i, m in zip(ids, mask) if m])
        assert scored == "".join(m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant")


def test_held_out_pairs_never_in_training():
    from fm_demo.tiny.tasks import held_out, task_add, task_compare

    rng = random.Random(0)
    for _ in range(300):
        for task in (task_add, task_compare):
            nums = [int(s) for s in re.findall(r"\d+", task(rng, "train")[0])]
            assert not held_out(*nums)


def test_training_scan_matches_reference_values_and_grads():
    from fm_demo.engine.ops import selective_scan_ref
    from fm_demo.tiny.scan import selective_scan_train

    g = torch.Generator().manual_seed(0)
    B, D, N, T = 2, 8, 4, 9
    shapes = [(B, D, T), (B, D, T), (D, N), (B, N, T), (B, N, T), (D,), (B, D, T)]
    xs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    xs[1] = xs[1].abs() + 0.1  # delta > 0
    xs[2] = -xs[2].abs() - 0.5  # A < 0
    ref = [x.clone().requires_grad_() for x in xs]
    new = [x.clone().requires_grad_() for x in xs]
    h0 = torch.zeros(B, D, N, dtype=torch.float64)
    y_ref, h_ref = selective_scan_ref(*ref, h0)
    y_new, h_new = selective_scan_train(*new, h0)
    torch.testing.assert_close(y_new, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_new.double(), h_ref.double(), rtol=1e-5, atol=1e-5)
    w = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    (y_ref * w).sum().backward()
    (y_new * w).sum().backward()
    for a, b in zip(ref, new):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4)
