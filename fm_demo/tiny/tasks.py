"""Synthetic dialogues and texts for the tiny checkpoints: pure functions of a seeded RNG.

Every single-turn task returns (user message, exact expected reply). Three things are split once,
deterministically, into a training part and a held-out part, so the test sets ask what the model
never saw: the number pairs of the arithmetic and comparison tasks (`split="test"`), the wordings
of every question (`wording="test"`, see wordings.py) and the out-of-scope prompts the model
learns to decline (`task_scope`). Facts, spellings and the memory game cannot be held out the same
way (the model has to have met every country and word); there the test set differs by seed,
wording and dialogue context.
"""

from __future__ import annotations

import random
import re
from typing import Callable

from .tables import (ACTIVITIES, ANIMAL_FACTS, ANIMALS, CAPITALS, COLORS, CREATIVE, FALCON_FACTS,
                     FEELINGS, NAMES, NUMBER_WORDS, OBJECTS, OPEN_QUESTIONS, PLACES, SCOPE_REPLY,
                     SMALL_TALK, SYSTEM_PROMPTS, UNKNOWN_COUNTRIES, UNKNOWN_WORDS, WORDS)
from . import wordings
from .wordings import composed, dress, falcon_wide, open_wide, part, phrase

Message = dict[str, str]
Task = Callable[..., tuple[str, str]]  # (rng, split, wording="train") -> (question, reply)
ADD_MAX = 99  # operands of + and -: two digits, worked column by column
COMPARE_MAX = 99


def held_out(a: int, b: int) -> bool:
    """About one pair in seven belongs to the test set, fixed for all seeds."""
    return (a * 37 + b * 11) % 7 == 3


def _pair(rng: random.Random, lo: int, hi: int, split: str, ok: Callable[[int, int], bool]) -> tuple[int, int]:
    while True:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if ok(a, b) and held_out(a, b) == (split == "test"):
            return a, b


def spaced(letters: str) -> str:
    return " ".join(letters)


def column_add(a: int, b: int) -> str:
    """a + b worked in columns, ones first, as the model writes it: every step is a one-digit fact."""
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    carry = (a0 + b0) // 10
    ones = f"Ones: {a0} + {b0} = {a0 + b0}" + (", carry 1." if carry else ".")
    tens = f"Tens: {a1} + {b1}" + (" + 1" if carry else "") + f" = {a1 + b1 + carry}."
    return f"{ones} {tens} {a} + {b} = {a + b}."


def column_sub(a: int, b: int) -> str:
    """a - b (a >= b) worked in columns, ones first, borrowing from the tens when needed."""
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    borrow = int(a0 < b0)
    ones = f"Ones: {a0 + 10 * borrow} - {b0} = {a0 + 10 * borrow - b0}" + (", borrow 1." if borrow else ".")
    tens = f"Tens: {a1} - {b1}" + (" - 1" if borrow else "") + f" = {a1 - b1 - borrow}."
    return f"{ones} {tens} {a} - {b} = {a - b}."


def compare_reply(a: int, b: int, template: str) -> str:
    """The reply a comparison wording asks for: "Is {a} ...?" gets yes or no, smaller/less/lower
    asks for the smaller number, anything else for the larger one."""
    smaller = re.search("smaller|less|lower", template) is not None
    if re.search(r"\bis \{a\}|\{a\} is", template, re.IGNORECASE) is None:
        hi, lo = max(a, b), min(a, b)
        return f"{lo} is smaller than {hi}." if smaller else f"{hi} is larger than {lo}."
    yes = (a < b) if smaller else (a > b)
    return f"{'Yes' if yes else 'No'}, {a} is {'larger' if a > b else 'smaller'} than {b}."


def task_add(rng: random.Random, split: str, wording: str = "train") -> tuple[str, str]:
    a, b = _pair(rng, 0, ADD_MAX, split, lambda a, b: True)
    return phrase(rng, "add", wording, a=a, b=b)[0], column_add(a, b)


def task_sub(rng: random.Random, split: str, wording: str = "train") -> tuple[str, str]:
    a, b = _pair(rng, 0, ADD_MAX, split, lambda a, b: a >= b)
    return phrase(rng, "sub", wording, a=a, b=b)[0], column_sub(a, b)


def task_compare(rng: random.Random, split: str, wording: str = "train") -> tuple[str, str]:
    a, b = _pair(rng, 0, COMPARE_MAX, split, lambda a, b: a != b)
    q, template = phrase(rng, "compare", wording, a=a, b=b)
    return q, compare_reply(a, b, template)


def task_capital(rng: random.Random, split: str, wording: str = "train") -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    return phrase(rng, "capital", wording, c=country)[0], f"The capital of {country} is {CAPITALS[country]}."


def task_spell(rng: random.Random, split: str, wording: str = "train") -> tuple[str, str]:
    w = rng.choice(WORDS)
    return phrase(rng, "spell", wording, w=w)[0], spaced(w)


def task_reverse(rng: random.Random, split: str, wording: str = "train") -> tuple[str, str]:
    w = rng.choice(WORDS)
    return phrase(rng, "reverse", wording, w=w)[0], spaced(w[::-1])


def task_count(rng: random.Random, split: str, wording: str = "train") -> tuple[str, str]:
    w = rng.choice(WORDS)
    return phrase(rng, "count", wording, w=w)[0], f"The word {w} has {len(w)} letters."


def task_falcon(rng: random.Random, split: str, wording: str = "train") -> tuple[str, str]:
    fact = rng.randrange(len(FALCON_FACTS))
    train_questions, test_questions, answer = FALCON_FACTS[fact]
    q = (composed(rng, wording, lambda: (falcon_wide(fact),))
         or rng.choice(part((train_questions, test_questions), wording)))
    return dress(rng, q, wording), answer


def task_small_talk(rng: random.Random, split: str, wording: str = "train") -> tuple[str, str]:
    questions, answer = rng.choice(SMALL_TALK)
    return dress(rng, rng.choice(questions), wording), answer


# ---- out of scope: a short, honest reply instead of an invented answer ----------------------------
def _pseudo_word(rng: random.Random) -> str:
    """A made-up word (consonant-vowel pattern), never one the model knows or a held-out one."""
    while True:
        w = "".join(rng.choice("bcdfghjklmnprstvwz" if i % 2 == 0 else "aeiou")
                    for i in range(rng.randint(3, 8)))
        if w not in WORDS and w not in UNKNOWN_WORDS[1]:
            return w


def _big_number(rng: random.Random) -> int:
    return rng.randint(100, 999) if rng.random() < 0.8 else rng.randint(1000, 99999)


def scope_question(rng: random.Random, split: str) -> tuple[str, str]:
    """(kind, question) of something the model cannot do; split="test" draws only held-out
    templates, words, countries and questions."""
    kind = rng.choices(SCOPE_KINDS, SCOPE_WEIGHTS)[0]
    if kind == "creative":
        forms, topics = part(CREATIVE, split)
        return kind, phrase(rng, "creative", split, form=rng.choice(forms), topic=rng.choice(topics))[0]
    if kind == "open question":
        q = composed(rng, split, lambda: (open_wide(),)) or rng.choice(part(OPEN_QUESTIONS, split))
        return kind, dress(rng, q, split)
    if kind == "number above 99":
        a, b = ((_big_number(rng), rng.randint(0, 999)) if rng.random() < 0.5
                else (rng.randint(0, 999), _big_number(rng)))
        return kind, phrase(rng, rng.choice(("add", "sub", "compare")), split, a=a, b=b)[0]
    if kind == "negative result":  # not "the difference between a and b": people mean |a - b|
        a, b = sorted(rng.sample(range(ADD_MAX + 1), 2))
        while "difference" in (q := phrase(rng, "sub", split, a=a, b=b))[1]:
            pass
        return kind, q[0]
    if kind == "multiply or divide":
        return kind, phrase(rng, "multiply", split, a=rng.randint(2, 99), b=rng.randint(2, 12))[0]
    if kind == "unknown word":
        pool = part(UNKNOWN_WORDS, split)
        w = _pseudo_word(rng) if split == "train" and rng.random() < 0.3 else rng.choice(pool)
        return kind, phrase(rng, rng.choice(("spell", "reverse", "count")), split, w=w)[0]
    return kind, phrase(rng, "capital", split, c=rng.choice(part(UNKNOWN_COUNTRIES, split)))[0]


SCOPE_KINDS = ("creative", "open question", "number above 99", "negative result", "multiply or divide",
               "unknown word", "unknown country")
SCOPE_WEIGHTS = (2, 3, 2, 1, 1, 3, 1)


def task_scope(rng: random.Random, split: str, wording: str = "train") -> tuple[str, str]:
    """Out of scope: the held-out prompts (split="test") are new templates, words and questions."""
    return scope_question(rng, split)[1], SCOPE_REPLY


# Tasks scored by evaluate.py (small talk is for the demo's feel only; out-of-scope prompts are
# scored on their own).
TASKS: dict[str, Task] = {
    "add": task_add, "sub": task_sub, "compare": task_compare, "capital": task_capital,
    "spell": task_spell, "reverse": task_reverse, "count": task_count, "falcon": task_falcon,
}
TRAIN_TASKS: dict[str, Task] = {**TASKS, "small_talk": task_small_talk, "scope": task_scope}
# Turns per task, relative. The hardest skill is carrying a word's identity from the question to
# the reply (spelling, reversing, counting, capitals): those tasks get twice the turns of the facts
# and small talk, like column arithmetic, which has the most steps; declining has the widest range
# of prompts.
TRAIN_WEIGHTS = {name: {"add": 2, "sub": 2, "compare": 1.5, "capital": 1.5, "spell": 2, "reverse": 2,
                        "count": 1.5, "scope": 2}.get(name, 1) for name in TRAIN_TASKS}
# The second stage (composed requests) gives comparisons, whose numbers can now stand anywhere in
# the request, the most turns; declining gets more as every composed wording widens what the model
# answers, and Falcon questions more as theirs share words across facts ("Who is behind ...?",
# "What architecture is behind ...?").
WIDE_WEIGHTS = {**TRAIN_WEIGHTS, "compare": 4, "scope": 3, "falcon": 1.5}
# First stage of training: the tasks in their first few plain wordings, nothing declined yet, so the
# model learns to carry a word across a fixed, short distance before it meets the many wordings.
CORE_TASKS = {name: task for name, task in TRAIN_TASKS.items() if name != "scope"}
# Questions between "remember" and "recall" in the memory game (a declined one among them too).
DISTRACTORS: dict[str, Task] = {**TASKS, "scope": task_scope}


def recall_dialogue(rng: random.Random, split: str, distractors: int | None = None,
                    wording: str = "train") -> list[Message]:
    """Remember a word, answer 1-2 other questions, then recall the word (the last reply is scored)."""
    w = rng.choice(WORDS)
    msgs = [{"role": "user", "content": phrase(rng, "remember", wording, w=w)[0]},
            {"role": "assistant", "content": f"OK, I will remember the word {w}."}]
    for _ in range(rng.randint(1, 2) if distractors is None else distractors):
        msgs += _turn(rng, split, TASKS if wording == "core" else DISTRACTORS, wording=wording)
    msgs += [{"role": "user", "content": phrase(rng, "recall", wording)[0]},
             {"role": "assistant", "content": f"You asked me to remember the word {w}."}]
    return msgs


def _turn(rng: random.Random, split: str, tasks: dict, weights: dict | None = None,
          wording: str = "train") -> list[Message]:
    names = sorted(tasks)
    name = rng.choices(names, [weights[n] for n in names])[0] if weights else rng.choice(names)
    q, a = tasks[name](rng, split, wording)
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def instruct_dialogue(rng: random.Random, split: str = "train", core: bool = False) -> list[Message]:
    """One training dialogue: 1-3 task turns or a memory game, sometimes after a system prompt.
    core=True: the first stage's plain wordings and tasks (see CORE_TASKS)."""
    wording = "core" if core else split
    msgs = []
    if rng.random() < 0.25:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < 0.3:
        return msgs + recall_dialogue(rng, split, wording=wording)
    weights = WIDE_WEIGHTS if wordings.FRAMED else TRAIN_WEIGHTS
    for _ in range(rng.choice((1, 1, 2, 3))):
        msgs += _turn(rng, split, CORE_TASKS if core else TRAIN_TASKS, weights, wording=wording)
    return msgs


# ---- base model: plain English ------------------------------------------------------------------
def _story(rng: random.Random) -> str:
    name, animal, place = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES)
    act, obj, color, feel = rng.choice(ACTIVITIES), rng.choice(OBJECTS), rng.choice(COLORS), rng.choice(FEELINGS)
    friend = rng.choice([n for n in NAMES if n != name])
    return (f"Once upon a time, a little {animal} named {name} lived in a {place}. "
            f"Every day, {name} liked to {act}. One morning, {name} found a {color} {obj}. "
            f"{name} felt {feel} and showed the {obj} to a friend called {friend}. "
            f"Together they took the {color} {obj} home, and {name} was {feel} all day.")


def _capital_text(rng: random.Random) -> str:
    countries = rng.sample(sorted(CAPITALS), 3)
    return " ".join(f"The capital of {c} is {CAPITALS[c]}." for c in countries)


def _animal_text(rng: random.Random) -> str:
    return " ".join(ANIMAL_FACTS[a] for a in rng.sample(sorted(ANIMAL_FACTS), 3))


def _number_text(rng: random.Random) -> str:
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    n = rng.randint(1, 9)
    return (f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}. "
            f"The number {n} comes after {n - 1} and before {n + 1}.")


def _falcon_text(rng: random.Random) -> str:
    facts = [answer for *_, answer in FALCON_FACTS[:-1]]
    return " ".join(rng.sample(facts, 3))


def base_text(rng: random.Random) -> str:
    """One short plain-English document (a story, facts, or a description)."""
    kind = rng.choices((_story, _capital_text, _animal_text, _number_text, _falcon_text),
                       weights=(4, 2, 2, 1, 1))[0]
    return kind(rng)
