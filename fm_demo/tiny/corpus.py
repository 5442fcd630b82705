"""Training rows for the tiny checkpoints: token ids plus a loss mask, packed to a fixed length.

Shapes: R rows, T+1 tokens per row (inputs are row[:-1], targets row[1:]).

Instruct rows hold whole dialogues only (each row starts at a dialogue, as a chat starts from an
empty state) and the loss covers assistant replies and their <|im_end|>, the only tokens the model
has to produce. Base rows are a plain stream of documents separated by <|endoftext|>, all tokens
scored.
"""

from __future__ import annotations

import random
from typing import Iterator

import torch

from . import wordings
from .tasks import base_text, instruct_dialogue
from .tokenizer import EOT_ID, IM_END_ID, IM_START_ID


def encode_dialogue(tok, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of render_chat(messages) and a 0/1 mask marking assistant replies + <|im_end|>.

    Encoded piece by piece so the mask is exact; the byte-level pre-tokenizer splits at every
    newline, so this equals encoding the rendered text in one go (tests check it).
    """
    nl = tok.encode("\n").ids
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        head = [IM_START_ID] + tok.encode(m["role"] + "\n").ids
        body = tok.encode(m["content"]).ids + [IM_END_ID]
        scored = 1 if m["role"] == "assistant" else 0
        ids += head + body + nl
        mask += [0] * len(head) + [scored] * len(body) + [0] * len(nl)
    return ids, mask


def instruct_rows(tok, seed: int, seq_len: int, split: str = "train", core_rows: int = 0,
                  framed: float = 0.0) -> Iterator[tuple[list[int], list[int]]]:
    """Endless rows of seq_len+1 tokens, each a run of whole dialogues padded with <|endoftext|>.
    The first core_rows rows hold first-stage dialogues (tasks.instruct_dialogue(core=True));
    `framed` of the other requests are built from a frame (wordings.framed)."""
    rng = random.Random(seed)
    rows = 0

    def dialogue() -> tuple[list[int], list[int]]:
        with wordings.framed(framed):
            return encode_dialogue(tok, instruct_dialogue(rng, split, core=rows < core_rows))

    pending = dialogue()
    while True:
        ids, mask = [], []
        while len(ids) + len(pending[0]) + 1 <= seq_len + 1:
            ids += pending[0] + [EOT_ID]
            mask += pending[1] + [0]
            pending = dialogue()
        if not ids:  # a dialogue longer than a row: cut it (rare; keeps the stream going)
            ids, mask = pending[0][: seq_len + 1], pending[1][: seq_len + 1]
            pending = dialogue()
        pad = seq_len + 1 - len(ids)
        rows += 1
        yield ids + [EOT_ID] * pad, mask + [0] * pad


def base_rows(tok, seed: int, seq_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """Endless rows of seq_len+1 tokens cut from a stream of documents."""
    rng = random.Random(seed)
    buf: list[int] = []
    while True:
        while len(buf) < seq_len + 1:
            buf += tok.encode(base_text(rng)).ids + [EOT_ID]
        row, buf = buf[: seq_len + 1], buf[seq_len + 1:]
        yield row, [1] * len(row)


def batches(rows: Iterator[tuple[list[int], list[int]]], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Group rows into (ids [B, T+1] int64, mask [B, T+1] float)."""
    while True:
        chunk = [next(rows) for _ in range(batch_size)]
        yield (torch.tensor([r[0] for r in chunk], dtype=torch.long),
               torch.tensor([r[1] for r in chunk], dtype=torch.float32))
