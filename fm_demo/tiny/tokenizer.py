"""Byte-level BPE tokenizer of the tiny checkpoints, with Falcon Mamba instruct's chat format.

Digits are split one per token (as in Falcon's own tokenizer) so that arithmetic is learnable
digit by digit. Special tokens sit at fixed ids 0-2, so configs can name them. The vocabulary is
pinned (`load_tokenizer`): both checkpoints share it.
"""

from __future__ import annotations

from pathlib import Path

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2
EOT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
VOCAB_SIZE = 2048  # multiple of 64: embedding rows and lm_head out_features suit 4-bit kernels

# falcon-mamba-7b-instruct's format: <|im_start|>role\n...<|im_end|>\n, prompt <|im_start|>assistant\n
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Plain-Python twin of CHAT_TEMPLATE (tests check that both agree)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def load_tokenizer():
    """The pinned vocabulary of both checkpoints, as a tokenizers.Tokenizer.

    A byte-level BPE fitted once on 20,000 texts of the first corpus (digits split, specials at
    ids 0-2). It is pinned rather than refitted because every weight of the base model depends on
    its ids: the task texts can change and the instruct model be retrained on the same vocabulary.
    Any text still encodes, new words as more pieces.
    """
    from tokenizers import Tokenizer

    from . import checkpoint_path

    tok = Tokenizer.from_file(str(checkpoint_path("base") / "tokenizer.json"))
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, f"{s} must have id {i}"
    return tok


def save_tokenizer(tok, out_dir: Path, variant: str) -> None:
    """Write tokenizer.json + tokenizer_config.json so AutoTokenizer.from_pretrained(out_dir) works.

    Base ends documents with <|endoftext|>; instruct's end of turn, <|im_end|>, is its eos so that
    generate() and the app stop at the end of a reply. The chat template goes into
    tokenizer_config.json, where checkpoints on the hub keep it (falcon-mamba-7b-instruct,
    Falcon3-Mamba-7B-Instruct), rather than transformers 5's separate chat_template.jinja: the app
    renders every instruct prompt with it (fm_demo/templates.py).
    """
    from transformers import PreTrainedTokenizerFast

    eos = IM_END if variant == "instruct" else ENDOFTEXT
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=ENDOFTEXT, eos_token=eos, pad_token=ENDOFTEXT,
        unk_token=None, additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE, model_max_length=1 << 20, clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir), save_jinja_files=False)
