"""Bundled tiny checkpoints: loading, chat format, tokenizer, training scan and golden outputs."""

from __future__ import annotations

import json
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


def test_both_checkpoints_share_the_pinned_vocabulary(loaded):
    from fm_demo.tiny.tokenizer import load_tokenizer

    # training reads the pinned vocabulary, so a change to the task texts changes no token id
    pinned = json.loads(load_tokenizer().to_str())["model"]
    for variant in ("base", "instruct"):
        bundled = json.loads(loaded[variant][1].backend_tokenizer.to_str())["model"]
        assert pinned["vocab"] == bundled["vocab"] and pinned["merges"] == bundled["merges"], variant


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
    from fm_demo.tiny.tasks import held_out, task_add, task_compare, task_sub

    rng = random.Random(0)
    for _ in range(300):
        for task in (task_add, task_sub, task_compare):
            q, a = task(rng, "train")
            # operands in order: the reply's last equation for + and -, the question for compare
            text = q if task is task_compare else a.rsplit(". ", 1)[-1]
            nums = [int(s) for s in re.findall(r"\d+", text)][:2]
            assert not held_out(*nums), (q, a)


def _training_user_messages(n_dialogues: int) -> list[str]:
    from fm_demo.tiny.tasks import instruct_dialogue
    from fm_demo.tiny.wordings import framed, normalize

    rng = random.Random(0)  # the training stream's own generator, another seed
    with framed(0.4):  # both stages: plain wordings, every wording, and requests built from frames
        return [normalize(m["content"]) for i in range(n_dialogues)
                for m in instruct_dialogue(rng, core=i % 4 == 0) if m["role"] == "user"]


def test_first_stage_rows_hold_plain_wordings_then_the_full_corpus_follows():
    from fm_demo.tiny.corpus import instruct_rows
    from fm_demo.tiny.tables import FALCON_FACTS, SCOPE_REPLY, SMALL_TALK
    from fm_demo.tiny.tokenizer import load_tokenizer
    from fm_demo.tiny.wordings import CORE, WORDINGS, normalize

    tok = load_tokenizer()
    rows = instruct_rows(tok, seed=1, seq_len=160, core_rows=200)
    texts = [tok.decode(next(rows)[0], skip_special_tokens=False) for _ in range(400)]
    users = [[m.split("<|im_end|>")[0] for m in t.split("<|im_start|>user\n")[1:]] for t in texts]
    fields = {"{a}": r"\d+", "{b}": r"\d+", "{w}": "[a-z]+", "{c}": "[a-z ]+"}
    plain = [re.compile("".join(fields.get(p, re.escape(p)) for p in re.split(r"(\{\w\})", normalize(t))))
             for train, _ in WORDINGS.values() for t in train[:CORE]]
    fixed = {normalize(q) for qs, _ in SMALL_TALK for q in qs} | {normalize(q) for qs, _, _ in FALCON_FACTS for q in qs[:CORE]}

    def is_plain(message: str) -> bool:
        n = normalize(message)
        return n in fixed or any(p.fullmatch(n) for p in plain)

    core, full = users[:200], users[200:]
    assert all(is_plain(u) for msgs in core for u in msgs)  # first stage: plain wordings only
    assert sum(not is_plain(u) for msgs in full for u in msgs) > 100  # most are dressed or other wordings
    assert not any(SCOPE_REPLY in t for t in texts[:200]) and any(SCOPE_REPLY in t for t in texts[200:])


def test_held_out_wordings_and_out_of_scope_prompts_never_in_training():
    from fm_demo.tiny.tables import CREATIVE, FALCON_FACTS, OPEN_QUESTIONS, UNKNOWN_COUNTRIES, UNKNOWN_WORDS
    from fm_demo.tiny.wordings import (PREFIXES, SUFFIXES, WIDE_PREFIXES, WIDE_SUFFIXES, WORDINGS, falcon_wide,
                                       normalize, open_wide, pattern, wide)

    # a sample of the training stream, plus every composed request, prefix and suffix of the second stage
    composed = [t for task in WORDINGS for fam in wide(task) for t in fam] + list(open_wide())
    composed += [t for fact in range(len(FALCON_FACTS)) for t in falcon_wide(fact)]
    fill = {"a": "12", "b": "7", "w": "river", "c": "spain", "form": "poem", "topic": "the sea"}
    users = (_training_user_messages(2000) + [normalize(t.format(**fill)) for t in composed]
             + [normalize(d) for d in WIDE_PREFIXES + WIDE_SUFFIXES])
    assert len(composed) > 5000
    held = ([t for _, test in WORDINGS.values() for t in test] + [q for _, test, _ in FALCON_FACTS for q in test]
            + list(PREFIXES[1]) + list(SUFFIXES[1]) + list(OPEN_QUESTIONS[1]))
    for template in held:
        pat = pattern(template)
        assert not any(pat.search(u) for u in users), template
    text = " " + " | ".join(users) + " "
    names = UNKNOWN_WORDS[1] + UNKNOWN_COUNTRIES[1] + CREATIVE[1][0] + CREATIVE[1][1]
    for name in names:  # held-out unknown words, countries, creative forms and topics
        assert f" {normalize(name)} " not in text, name


def test_out_of_scope_test_prompts_use_only_held_out_parts():
    from fm_demo.tiny.tables import CAPITALS, UNKNOWN_COUNTRIES, UNKNOWN_WORDS, WORDS
    from fm_demo.tiny.tasks import SCOPE_KINDS, scope_question
    from fm_demo.tiny.wordings import normalize

    assert not set(UNKNOWN_WORDS[0] + UNKNOWN_WORDS[1]) & set(WORDS)
    assert not set(UNKNOWN_COUNTRIES[0] + UNKNOWN_COUNTRIES[1]) & set(CAPITALS)
    rng = random.Random(1)
    items = [scope_question(rng, "test") for _ in range(400)]
    assert {kind for kind, _ in items} == set(SCOPE_KINDS)
    users = set(_training_user_messages(2000))
    assert not any(normalize(q) in users for _, q in items)
    for kind, q in items:
        if kind == "unknown word":
            assert any(re.search(rf"\b{w}\b", q, re.IGNORECASE) for w in UNKNOWN_WORDS[1]), q
        if kind == "unknown country":
            assert any(c.lower() in q.lower() for c in UNKNOWN_COUNTRIES[1]), q


def test_compare_reply_follows_the_wording():
    from fm_demo.tiny.tasks import compare_reply

    cases = {("Which is larger, {a} or {b}?", 3, 8): "8 is larger than 3.",
             ("{a} vs {b}: which is less?", 3, 8): "3 is smaller than 8.",
             ("Is {a} greater than {b}?", 17, 9): "Yes, 17 is larger than 9.",
             ("Is {a} greater than {b}?", 9, 17): "No, 9 is smaller than 17.",
             ("Is {a} less than {b}?", 17, 9): "No, 17 is larger than 9.",
             ("Would you say {a} is greater than {b}?", 40, 4): "Yes, 40 is larger than 4."}
    for (template, a, b), want in cases.items():
        assert compare_reply(a, b, template) == want, template


def test_every_comparison_wording_gets_a_true_reply_to_what_it_asks():
    """Plain and composed wordings alike: a yes/no question ("Is {a} higher than {b}?", "I think {a}
    is less than {b}") gets Yes exactly when its claim holds, any other asks for the number its
    comparative word names."""
    from fm_demo.tiny.tasks import compare_reply
    from fm_demo.tiny.wordings import WORDINGS, wide

    up, down = {"greater", "bigger", "larger", "more", "higher"}, {"smaller", "less", "lower"}
    templates = [t for ws in WORDINGS["compare"] for t in ws] + [t for fam in wide("compare") for t in fam]
    assert len(templates) > 1000
    for template in templates:
        words = set(re.findall(r"[a-z]+", template.lower()))
        if "compare" in words:  # "Compare {a} and {b}.": no comparative word, the larger by default
            words |= {"larger"}
        (word,) = words & (up | down)
        yes_no = re.search(r"\{a\} is|is \{a\}", template, re.IGNORECASE) is not None
        for a, b in ((17, 9), (9, 17), (40, 41)):
            reply = compare_reply(a, b, template)
            truth = f"{a} is {'larger' if a > b else 'smaller'} than {b}."
            if yes_no:
                claim = (a > b) if word in up else (a < b)
                assert reply == f"{'Yes' if claim else 'No'}, {truth}", (template, a, b, reply)
            else:
                pick = max(a, b) if word in up else min(a, b)
                other = a + b - pick
                assert reply == f"{pick} is {'larger' if pick > other else 'smaller'} than {other}.", template


def test_composed_requests_expand_every_choice():
    from fm_demo.tiny.wordings import expand

    assert expand("[what is|] {a} [plus|+] {b}[?|]") == (
        "What is {a} plus {b}?", "What is {a} plus {b}", "What is {a} + {b}?", "What is {a} + {b}",
        "{a} plus {b}?", "{a} plus {b}", "{a} + {b}?", "{a} + {b}")


def _calc(expr: str) -> int:
    """Value of "a + b", "a - b - c"...: integers joined by + and -."""
    parts = expr.split()
    total = int(parts[0])
    for op, n in zip(parts[1::2], parts[2::2]):
        total += int(n) if op == "+" else -int(n)
    return total


def test_column_arithmetic_steps_are_true_for_every_pair():
    from fm_demo.tiny.tasks import ADD_MAX, column_add, column_sub

    step = re.compile(r"(\d+(?: [+-] \d+)+) = (\d+)")
    for a in range(ADD_MAX + 1):
        for b in range(ADD_MAX + 1):
            cases = [("+", a + b, column_add(a, b))] + ([("-", a - b, column_sub(a, b))] if a >= b else [])
            for op, want, text in cases:
                eqs = step.findall(text)
                assert len(eqs) == 3, text  # ones column, tens column, result
                for lhs, rhs in eqs:
                    assert _calc(lhs) == int(rhs), text  # each step is a true one-digit fact
                assert eqs[-1] == (f"{a} {op} {b}", str(want)), text
                ones, tens = int(eqs[0][1]), int(eqs[1][1])
                # the answer is the tens column's digits followed by the ones column's last digit
                assert want == tens * 10 + ones % 10, text


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


# Greedy outputs of the committed checkpoints through the serving engine, recorded once.
# Prompt ids are pinned too, so a tokenizer change shows up here rather than as a model change.
GOLDEN_INSTRUCT_ADD = (  # 47 + 35 is a held-out pair: the model never saw it in training
    [1, 290, 201, 435, 287, 223, 22, 25, 323, 223, 21, 23, 33, 2, 201, 1, 289, 201],  # What is 47 + 35?
    [364, 28, 223, 25, 323, 223, 23, 300, 223, 19, 20, 14, 532, 223, 19, 16, 365, 28, 223, 22, 323,
     223, 21, 323, 223, 19, 300, 223, 26, 16, 223, 22, 25, 323, 223, 21, 23, 300, 223, 26, 20, 16, 2],
)  # Ones: 7 + 5 = 12, carry 1. Tens: 4 + 3 + 1 = 8. 47 + 35 = 82.<|im_end|>
GOLDEN_BASE_STORY = (
    [419, 427, 266, 409, 14, 266, 431],  # Once upon a time, a little
    [748, 424, 515, 426, 343, 266, 493, 871, 16, 428, 344, 14, 515, 422, 294, 701],
)  # dog named Nora lived in a small farm. Every day, Nora liked to run
# Three turns on one state; turns 2 and 3 are read on top of the cached state (prompt = "\n" +
# the new turn), never the whole transcript.
GOLDEN_RECALL = [
    ([1, 290, 201, 510, 273, 306, 665, 16, 2, 201, 1, 289, 201],  # Remember the word falcon.
     [449, 14, 335, 450, 332, 273, 306, 665, 16, 2]),
    ([201, 1, 290, 201, 547, 273, 306, 883, 16, 2, 201, 1, 289, 201],  # Spell the word river.
     [84, 274, 616, 396, 297, 2]),
    ([201, 1, 290, 201, 394, 306, 505, 335, 641, 382, 294, 332, 33, 2, 201, 1, 289, 201],
     [370, 451, 445, 294, 332, 273, 306, 665, 16, 2]),  # You asked me to remember the word falcon.
]


def _greedy(engine, prompt: list[int], state, max_new: int) -> list[int]:
    from fm_demo.engine import SamplingParams

    events = engine.stream(torch.tensor([prompt]), state, SamplingParams(), max_new, (IM_END_ID, EOT_ID))
    return [e.token_id for e in events]


def test_golden_instruct_single_turn(loaded):
    from fm_demo.engine import Engine

    model, tok = loaded["instruct"]
    prompt, want = GOLDEN_INSTRUCT_ADD
    text = tok.apply_chat_template([{"role": "user", "content": "What is 47 + 35?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert tok(text, add_special_tokens=False)["input_ids"] == prompt
    engine = Engine(model)
    assert _greedy(engine, prompt, engine.new_state(), 64) == want
    assert tok.decode(want, skip_special_tokens=True).endswith("47 + 35 = 82.")


def test_golden_base_continues_text(loaded):
    from fm_demo.engine import Engine

    model, tok = loaded["base"]
    prompt, want = GOLDEN_BASE_STORY
    assert tok("Once upon a time, a little", add_special_tokens=False)["input_ids"] == prompt
    engine = Engine(model)
    assert _greedy(engine, prompt, engine.new_state(), len(want)) == want


def test_golden_cross_turn_recall_from_cached_state(loaded):
    from fm_demo.engine import Engine

    model, tok = loaded["instruct"]
    engine = Engine(model)
    state = engine.new_state()
    for prompt, want in GOLDEN_RECALL:
        assert _greedy(engine, prompt, state, 20) == want
    assert tok.decode(GOLDEN_RECALL[-1][1], skip_special_tokens=True) == "You asked me to remember the word falcon."
    assert state.seqlen == sum(len(p) + len(w) for p, w in GOLDEN_RECALL)


def test_instruct_answers_held_out_questions_and_recalls_through_the_state(loaded):
    from fm_demo.engine import Engine
    from fm_demo.tiny.evaluate import accuracy, eval_recall, eval_scope, refused, task_replies

    model, tok = loaded["instruct"]
    engine = Engine(model)
    # a small slice of `python -m fm_demo.tiny.evaluate`: new questions (unseen number pairs for
    # add, sub and compare), the whole reply must match, greedy
    # thresholds sit below the full evaluation's figures (model card): a regression shows, noise does not
    seen, new = task_replies(engine, tok, n=10), task_replies(engine, tok, n=12, wording="test")
    assert all(v >= 0.7 for v in accuracy(seen).values()), accuracy(seen)  # 0.94 to 1.00 at n=100
    held = accuracy(new)  # held-out wordings: 0.96 on average at n=100, 0.88 to 1.00 by task
    assert sum(held.values()) / len(held) >= 0.8 and min(held.values()) >= 0.5, held
    assert refused(seen, new) <= 0.1  # in-scope questions declined: 0.0075 at n=100
    assert eval_scope(engine, tok, n=24)["all"] >= 0.7  # held-out out-of-scope prompts: 0.87 at n=200
    assert eval_recall(engine, tok, n=10) >= 0.9


def test_training_is_seeded_and_saves_a_loadable_checkpoint(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fm_demo.tiny.config import TinyDims, TrainConfig
    from fm_demo.tiny.tokenizer import load_tokenizer
    from fm_demo.tiny.train import train

    tok = load_tokenizer()
    dims = TinyDims(hidden_size=64, intermediate_size=128, num_hidden_layers=2, time_step_rank=16)
    cfg = TrainConfig(variant="instruct", steps=6, batch_size=2, seq_len=48, warmup=2, log_every=3)
    threads = torch.get_num_threads()
    try:
        runs = [train(cfg, dims, tmp_path / name, tok) for name in ("a", "b")]
    finally:
        torch.set_num_threads(threads)  # train() sets cfg.threads for the process
    assert runs[0]["steps_done"] == 6 and runs[0]["final_loss"] == runs[1]["final_loss"]
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights
    assert {t.dtype for t in a.values()} == {torch.float16}  # fp16 on disk: half the bytes in git
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert model.config.model_type == "falcon_mamba" and model.config.hidden_size == 64
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # computes as it was trained
    assert AutoTokenizer.from_pretrained(tmp_path / "a").eos_token == "<|im_end|>"
    assert json.loads((tmp_path / "a" / "training.json").read_text())["train_config"]["seed"] == cfg.seed
