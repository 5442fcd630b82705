"""Held-out evaluation of the tiny checkpoints: python -m fm_demo.tiny.evaluate --json

Test sets come from the training generators with other seeds and the held-out number pairs
(`tasks.held_out`). Everything runs through the serving engine: replies are greedy, and the
memory game continues every turn from the cached recurrent state (only the new turn's tokens are
read), never re-encoding the conversation. Replies are decoded in batches of equal-length prompts;
a batch row is the same computation as a single stream, just several at once.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict

import torch

from . import checkpoint_path
from .tasks import TASKS, recall_dialogue
from .tokenizer import EOT_ID, IM_END_ID, render_chat

TEST_SEED = 10_000  # training streams use seeds < 100
STOPS = (IM_END_ID, EOT_ID)


def load(variant: str, four_bit: bool = False):
    """(model, tokenizer) from the bundled folder, in fp32 or bitsandbytes 4-bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = checkpoint_path(variant)
    kwargs = {}
    if four_bit:
        kwargs = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
                  "device_map": "cpu"}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval(), AutoTokenizer.from_pretrained(path)


def turn_ids(tok, messages: list[dict[str, str]], first: bool) -> list[int]:
    """Tokens that open the next assistant reply given the state already holds every earlier turn.

    The state ends with the <|im_end|> the model generated, so a later turn starts with the "\\n"
    that the chat template puts after it.
    """
    text = render_chat(messages, add_generation_prompt=True)
    return tok(text if first else "\n" + text, add_special_tokens=False)["input_ids"]


def _split_state(state, r: int):
    from fm_demo.engine import State

    return State(state.conv[:, r:r + 1].clone(), state.ssm[:, r:r + 1].clone(), state.signature, state.seqlen)


def _stack_states(states):
    from fm_demo.engine import State

    return State(torch.cat([s.conv for s in states], 1), torch.cat([s.ssm for s in states], 1),
                 states[0].signature, max(s.seqlen for s in states))


def greedy_replies(engine, prompts: list[list[int]], states: list | None = None,
                   max_new_tokens: int = 64, max_batch: int = 64) -> tuple[list[list[int]], list]:
    """Greedy replies to each prompt (read on top of states[i], or a fresh state).

    Returns the generated ids (ending with the stop token when one came) and each row's state as
    it was right after its last generated token, exactly what Engine.stream leaves behind.
    """
    states = states or [engine.new_state() for _ in prompts]
    out_ids: list[list[int]] = [[] for _ in prompts]
    out_states: list = [None] * len(prompts)
    by_len = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    for length, rows in by_len.items():
        for start in range(0, len(rows), max_batch):
            group = rows[start:start + max_batch]
            state = _stack_states([states[i] for i in group])
            logits = engine.prefill(torch.tensor([prompts[i] for i in group]), state)  # [b, V]
            done = [False] * len(group)
            for _ in range(max_new_tokens):
                tok = logits.argmax(-1)  # [b]
                logits = engine.step(tok, state)
                for j, i in enumerate(group):
                    if done[j]:
                        continue
                    out_ids[i].append(int(tok[j]))
                    if int(tok[j]) in STOPS:
                        done[j], out_states[i] = True, _split_state(state, j)
                if all(done):
                    break
            for j, i in enumerate(group):
                if not done[j]:
                    out_states[i] = _split_state(state, j)
    return out_ids, out_states


def reply_text(tok, ids: list[int]) -> str:
    return tok.decode([t for t in ids if t not in STOPS], skip_special_tokens=True).strip()


def eval_tasks(engine, tok, n: int, seed: int = TEST_SEED, max_batch: int = 64,
               split: str = "test", names: tuple[str, ...] | None = None) -> dict[str, float]:
    """Exact-match accuracy per single-turn task on n held-out questions each.

    split="train" draws number pairs from the training part (new seed and wording only): the gap
    to split="test" shows how much of the arithmetic is memorised rather than computed.
    """
    result = {}
    for k, (name, task) in enumerate(sorted(TASKS.items())):
        if names is not None and name not in names:
            continue
        rng = random.Random(seed + k)
        items = [task(rng, split) for _ in range(n)]
        prompts = [turn_ids(tok, [{"role": "user", "content": q}], first=True) for q, _ in items]
        outs, _ = greedy_replies(engine, prompts, max_batch=max_batch)
        result[name] = sum(reply_text(tok, o) == a for o, (_, a) in zip(outs, items)) / n
    return result


def eval_recall(engine, tok, n: int, seed: int = TEST_SEED + 100, max_batch: int = 64) -> float:
    """Memory game: the model's own replies stay in the state; only the final recall is scored."""
    rng = random.Random(seed)
    dialogues = [recall_dialogue(rng, "test") for _ in range(n)]
    users = [[m for m in d if m["role"] == "user"] for d in dialogues]
    states = [engine.new_state() for _ in dialogues]
    finals = [""] * n
    for turn in range(max(len(u) for u in users)):
        rows = [i for i in range(n) if turn < len(users[i])]
        prompts = [turn_ids(tok, [users[i][turn]], first=turn == 0) for i in rows]
        outs, new_states = greedy_replies(engine, prompts, [states[i] for i in rows], max_batch=max_batch)
        for i, o, s in zip(rows, outs, new_states):
            states[i], finals[i] = s, reply_text(tok, o)
    return sum(f == d[-1]["content"] for f, d in zip(finals, dialogues)) / n


@torch.no_grad()
def perplexity(model, tok, n_rows: int, seq_len: int = 160, seed: int = TEST_SEED + 200) -> float:
    """Held-out perplexity on plain-English documents (base-model corpus, other seed)."""
    from fm_demo.engine import model_forward

    from .corpus import base_rows

    rows = base_rows(tok.backend_tokenizer, seed, seq_len)
    ids = torch.tensor([next(rows)[0] for _ in range(n_rows)])  # [R, T+1]
    logits = model_forward(model, ids[:, :-1])
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    return math.exp(nll.item())


def samples(tok, engines: dict) -> dict:
    """The same chat prompt and plain-text prompt through base and instruct, to show the difference."""
    chat = turn_ids(tok, [{"role": "user", "content": "What is the capital of Japan?"}], first=True)
    text = tok("Once upon a time, a little", add_special_tokens=False)["input_ids"]
    out = {}
    for variant, engine in engines.items():
        (a, b), _ = greedy_replies(engine, [chat, text], max_new_tokens=24)
        out[variant] = {"chat: What is the capital of Japan?": tok.decode(a),
                        "text: Once upon a time, a little": tok.decode(b)}
    return out


def evaluate(n: int = 100, n_rows: int = 32) -> dict:
    from fm_demo.engine import Engine

    t0 = time.time()
    report: dict = {"n_per_task": n}
    engines = {}
    for label, four_bit in (("fp32", False), ("4bit", True)):
        model, tok = load("instruct", four_bit)
        engine = Engine(model)
        tasks = eval_tasks(engine, tok, n)
        report[f"instruct_{label}"] = {"tasks": tasks, "mean": round(sum(tasks.values()) / len(tasks), 4),
                                       "recall_via_state": eval_recall(engine, tok, n)}
        if not four_bit:
            engines["instruct"] = engine
            report["instruct_fp32"]["arithmetic_training_pairs"] = eval_tasks(
                engine, tok, n, seed=TEST_SEED + 50, split="train", names=("add", "sub"))
            report["instruct_fp32"]["perplexity_plain_text"] = round(perplexity(model, tok, n_rows), 3)
    base, btok = load("base")
    engines["base"] = Engine(base)
    report["base_fp32"] = {"perplexity_plain_text": round(perplexity(base, btok, n_rows), 3)}
    report["samples"] = samples(btok, engines)
    report["seconds"] = round(time.time() - t0, 1)
    return report


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--n", type=int, default=100, help="test questions per task and memory games")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    report = evaluate(a.n)
    print(json.dumps(report, indent=None if a.json else 2))


if __name__ == "__main__":
    main()
