"""Held-out evaluation of the tiny checkpoints: python -m fm_demo.tiny.evaluate --json

Test sets come from the training generators with other seeds, the held-out number pairs
(`tasks.held_out`), the held-out wordings (`wordings.py`) and the held-out out-of-scope prompts
(`tasks.scope_question`). Everything runs through the serving engine: replies are greedy, and the
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
from pathlib import Path

import torch

from . import checkpoint_path
from .tables import SCOPE_REPLY
from .tasks import SCOPE_KINDS, TASKS, recall_dialogue, scope_question
from .tokenizer import EOT_ID, IM_END_ID, render_chat

TEST_SEED = 10_000  # training streams use seeds < 100
STOPS = (IM_END_ID, EOT_ID)
DECLINE = SCOPE_REPLY.split(". ")[0]  # "I am a tiny demo model and cannot do that"
# What a new user types first; evaluate prints the replies (the model card shows them).
DEMO_PROMPTS = ("what is 9 plus 5", "Is 17 greater than 9?", "Spell the word cat backwards.",
                "Hi! Could you tell me the capital of italy", "Write a poem about the sea.",
                "Spell the word mamba.", "What is 250 + 17?", "What can you do?")


def load(variant: str, four_bit: bool = False, path: Path | None = None):
    """(model, tokenizer) from the bundled folder (or `path`), in fp32 or bitsandbytes 4-bit.

    The weights are stored in fp16 or fp32; either way the model computes in fp32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = path or checkpoint_path(variant)
    kwargs: dict = {"dtype": torch.float32}
    if four_bit:
        kwargs |= {"quantization_config": BitsAndBytesConfig(
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
            state = _stack_states([states[i] for i in group])  # [layers, b, ...]
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


def task_replies(engine, tok, n: int, seed: int = TEST_SEED, split: str = "test", wording: str = "train",
                 names: tuple[str, ...] | None = None, max_batch: int = 64) -> dict[str, list[tuple[str, str]]]:
    """(expected, given) replies to n new questions per single-turn task.

    split="test" asks held-out number pairs (split="train": training pairs with a new seed, whose
    gap to "test" shows how much arithmetic is memorised); wording="test" asks in held-out wordings.
    """
    items = {}
    for k, (name, task) in enumerate(sorted(TASKS.items())):
        if names is None or name in names:
            rng = random.Random(seed + k + (500 if wording == "test" else 0))
            items[name] = [task(rng, split, wording) for _ in range(n)]
    # one call for all tasks: more prompts of equal length share a batch
    replies = iter(ask(engine, tok, [q for qa in items.values() for q, _ in qa], max_batch))
    return {name: [(a, next(replies)) for _, a in qa] for name, qa in items.items()}


def ask(engine, tok, questions: list[str], max_batch: int = 64) -> list[str]:
    """Greedy single-turn replies, as text."""
    prompts = [turn_ids(tok, [{"role": "user", "content": q}], first=True) for q in questions]
    outs, _ = greedy_replies(engine, prompts, max_batch=max_batch)
    return [reply_text(tok, o) for o in outs]


def accuracy(replies: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """Exact match per task: the whole reply (every step of a worked sum) must be right."""
    return {name: sum(want == got for want, got in pairs) / len(pairs) for name, pairs in replies.items()}


def refused(*replies: dict[str, list[tuple[str, str]]]) -> float:
    """Share of in-scope questions that got the out-of-scope reply instead of an answer."""
    got = [g for r in replies for pairs in r.values() for _, g in pairs]
    return sum(g.startswith(DECLINE) for g in got) / len(got)


def eval_tasks(engine, tok, n: int, seed: int = TEST_SEED, max_batch: int = 64, split: str = "test",
               names: tuple[str, ...] | None = None, wording: str = "train") -> dict[str, float]:
    """Exact-match accuracy per single-turn task on n held-out questions each."""
    return accuracy(task_replies(engine, tok, n, seed, split, wording, names, max_batch))


def eval_scope(engine, tok, n: int, seed: int = TEST_SEED + 300, split: str = "test",
               max_batch: int = 64) -> dict[str, float]:
    """Share of n held-out out-of-scope prompts answered with exactly the scope reply, per kind."""
    rng = random.Random(seed)
    items = [scope_question(rng, split) for _ in range(n)]
    ok = [r == SCOPE_REPLY for r in ask(engine, tok, [q for _, q in items], max_batch)]
    by_kind = {kind: [o for (k, _), o in zip(items, ok) if k == kind] for kind in SCOPE_KINDS}
    return {"all": sum(ok) / n, **{k: round(sum(v) / len(v), 4) for k, v in by_kind.items() if v}}


def eval_recall(engine, tok, n: int, seed: int = TEST_SEED + 100, max_batch: int = 64,
                wording: str = "train") -> float:
    """Memory game: the model's own replies stay in the state; only the final recall is scored."""
    rng = random.Random(seed)
    dialogues = [recall_dialogue(rng, "test", wording=wording) for _ in range(n)]
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


def eval_instruct(engine, tok, n: int) -> dict:
    """Every instruct figure: tasks in training wordings and in held-out wordings (both on held-out
    number pairs), out-of-scope prompts, in-scope questions refused, and the memory game."""
    seen, new = task_replies(engine, tok, n), task_replies(engine, tok, n, wording="test")
    tasks, held = accuracy(seen), accuracy(new)
    return {"tasks": tasks, "mean": round(sum(tasks.values()) / len(tasks), 4),
            "held_out_wordings": held, "mean_held_out_wordings": round(sum(held.values()) / len(held), 4),
            "out_of_scope_declined": eval_scope(engine, tok, 2 * n),
            "in_scope_refused": round(refused(seen, new), 4),
            "recall_via_state": eval_recall(engine, tok, n),
            "recall_via_state_held_out_wordings": eval_recall(engine, tok, n, seed=TEST_SEED + 150, wording="test")}


def evaluate(n: int = 100, n_rows: int = 32, instruct: Path | None = None) -> dict:
    from fm_demo.engine import Engine

    t0 = time.time()
    report: dict = {"n_per_task": n}
    engines = {}
    for label, four_bit in (("fp32", False), ("4bit", True)):
        model, tok = load("instruct", four_bit, instruct)
        engine = Engine(model)
        report[f"instruct_{label}"] = eval_instruct(engine, tok, n)
        if not four_bit:
            engines["instruct"] = engine
            report["instruct_fp32"]["arithmetic_training_pairs"] = eval_tasks(
                engine, tok, n, seed=TEST_SEED + 50, split="train", names=("add", "sub"))
            report["instruct_fp32"]["perplexity_plain_text"] = round(perplexity(model, tok, n_rows), 3)
            report["instruct_fp32"]["demo"] = dict(zip(DEMO_PROMPTS, ask(engine, tok, list(DEMO_PROMPTS))))
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
    p.add_argument("--instruct", type=Path, help="instruct checkpoint folder (default: the bundled one)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    report = evaluate(a.n, instruct=a.instruct)
    print(json.dumps(report, indent=None if a.json else 2))


if __name__ == "__main__":
    main()
