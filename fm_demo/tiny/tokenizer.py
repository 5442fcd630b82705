"""Byte-level BPE tokenizer of the tiny checkpoints, with Falcon Mamba instruct's chat format.

Digits are split one per token (as in Falcon's own tokenizer) so that arithmetic is learnable
digit by digit. Special tokens sit at fixed ids 0-2, so configs can name them.
"""

from __future__ import annotations

import random
from pathlib import Path

from .tasks import base_text, instruct_dialogue

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


def _training_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    texts = [base_text(rng) for _ in range(n)]
    texts += [render_chat(instruct_dialogue(rng)) for _ in range(n)]
    return texts


def build_tokenizer(seed: int = 1234, n_texts: int = 20000):
    """Train the BPE model on a fixed sample of both corpora; returns a tokenizers.Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_texts(seed, n_texts), trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, f"{s} must have id {i}"
    return tok


def save_tokenizer(tok, out_dir: Path, variant: str) -> None:
    """Write tokenizer.json + tokenizer_config.json so AutoTokenizer.from_pretrained(out_dir) works.

    Base ends documents with <|endoftext|>; instruct's end of turn, <|im_end|>, is its eos so that
    generate() and the app stop at the end of a reply.
    """
    from transformers import PreTrainedTokenizerFast

    eos = IM_END if variant == "instruct" else ENDOFTEXT
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=ENDOFTEXT, eos_token=eos, pad_token=ENDOFTEXT,
        unk_token=None, additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE, model_max_length=1 << 20, clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
