"""Synthetic dialogues and texts for the tiny checkpoints: pure functions of a seeded RNG.

Every single-turn task returns (user message, exact expected reply). Number pairs of the
arithmetic and comparison tasks are split once, deterministically, into a training part and a
held-out part, so the test set asks questions the model never saw (`split="test"`). Facts,
spellings and the memory game cannot be held out the same way (the model has to have met every
country and word); there the test set differs by seed, question wording and dialogue context.
"""

from __future__ import annotations

import random
from typing import Callable

from .tables import (ACTIVITIES, ANIMAL_FACTS, ANIMALS, CAPITALS, COLORS, FALCON_FACTS, FEELINGS,
                     NAMES, NUMBER_WORDS, OBJECTS, PLACES, SMALL_TALK, SYSTEM_PROMPTS, WORDS)

Message = dict[str, str]
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


def task_add(rng: random.Random, split: str) -> tuple[str, str]:
    a, b = _pair(rng, 0, ADD_MAX, split, lambda a, b: True)
    q = rng.choice(("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.", "{a} + {b} = ?"))
    return q.format(a=a, b=b), column_add(a, b)


def task_sub(rng: random.Random, split: str) -> tuple[str, str]:
    a, b = _pair(rng, 0, ADD_MAX, split, lambda a, b: a >= b)
    q = rng.choice(("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}."))
    return q.format(a=a, b=b), column_sub(a, b)


def task_compare(rng: random.Random, split: str) -> tuple[str, str]:
    a, b = _pair(rng, 0, COMPARE_MAX, split, lambda a, b: a != b)
    hi, lo = max(a, b), min(a, b)
    if rng.random() < 0.5:
        q = rng.choice(("Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"))
        return q.format(a=a, b=b), f"{hi} is larger than {lo}."
    q = rng.choice(("Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?"))
    return q.format(a=a, b=b), f"{lo} is smaller than {hi}."


def task_capital(rng: random.Random, split: str) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    q = rng.choice(("What is the capital of {c}?", "Name the capital city of {c}.",
                    "Which city is the capital of {c}?"))
    return q.format(c=country), f"The capital of {country} is {CAPITALS[country]}."


def task_spell(rng: random.Random, split: str) -> tuple[str, str]:
    w = rng.choice(WORDS)
    q = rng.choice(("Spell the word {w}.", "How do you spell {w}?", "Spell {w} letter by letter."))
    return q.format(w=w), spaced(w)


def task_reverse(rng: random.Random, split: str) -> tuple[str, str]:
    w = rng.choice(WORDS)
    q = rng.choice(("Reverse the letters of {w}.", "Write {w} backwards.", "Spell {w} in reverse."))
    return q.format(w=w), spaced(w[::-1])


def task_count(rng: random.Random, split: str) -> tuple[str, str]:
    w = rng.choice(WORDS)
    q = rng.choice(("How many letters are in the word {w}?", "Count the letters in {w}.",
                    "How long is the word {w}?"))
    return q.format(w=w), f"The word {w} has {len(w)} letters."


def task_falcon(rng: random.Random, split: str) -> tuple[str, str]:
    questions, answer = rng.choice(FALCON_FACTS)
    return rng.choice(questions), answer


def task_small_talk(rng: random.Random, split: str) -> tuple[str, str]:
    questions, answer = rng.choice(SMALL_TALK)
    return rng.choice(questions), answer


# Tasks scored by evaluate.py (small talk is for the demo's feel only).
TASKS: dict[str, Callable[[random.Random, str], tuple[str, str]]] = {
    "add": task_add, "sub": task_sub, "compare": task_compare, "capital": task_capital,
    "spell": task_spell, "reverse": task_reverse, "count": task_count, "falcon": task_falcon,
}
TRAIN_TASKS = {**TASKS, "small_talk": task_small_talk}
# Column arithmetic has the most steps to learn: it gets twice the turns of each other task.
TRAIN_WEIGHTS = {name: 2 if name in ("add", "sub") else 1 for name in TRAIN_TASKS}

REMEMBER = ("Remember the word {w}.", "Please remember the word {w}.", "Remember this word: {w}.")
RECALL = ("Which word did I ask you to remember?", "What was the word I told you to remember?",
          "Which word did I tell you to remember?")


def recall_dialogue(rng: random.Random, split: str, distractors: int | None = None) -> list[Message]:
    """Remember a word, answer 1-2 other questions, then recall the word (the last reply is scored)."""
    w = rng.choice(WORDS)
    msgs = [{"role": "user", "content": rng.choice(REMEMBER).format(w=w)},
            {"role": "assistant", "content": f"OK, I will remember the word {w}."}]
    for _ in range(rng.randint(1, 2) if distractors is None else distractors):
        msgs += _turn(rng, split, TASKS)
    msgs += [{"role": "user", "content": rng.choice(RECALL)},
             {"role": "assistant", "content": f"You asked me to remember the word {w}."}]
    return msgs


def _turn(rng: random.Random, split: str, tasks: dict, weights: dict | None = None) -> list[Message]:
    names = sorted(tasks)
    name = rng.choices(names, [weights[n] for n in names])[0] if weights else rng.choice(names)
    q, a = tasks[name](rng, split)
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def instruct_dialogue(rng: random.Random, split: str = "train") -> list[Message]:
    """One training dialogue: 1-3 task turns or a memory game, sometimes after a system prompt."""
    msgs = []
    if rng.random() < 0.25:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < 0.3:
        return msgs + recall_dialogue(rng, split)
    for _ in range(rng.choice((1, 1, 2, 3))):
        msgs += _turn(rng, split, TRAIN_TASKS, TRAIN_WEIGHTS)
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
    facts = [answer for _, answer in FALCON_FACTS[:-1]]
    return " ".join(rng.sample(facts, 3))


def base_text(rng: random.Random) -> str:
    """One short plain-English document (a story, facts, or a description)."""
    kind = rng.choices((_story, _capital_text, _animal_text, _number_text, _falcon_text),
                       weights=(4, 2, 2, 1, 1))[0]
    return kind(rng)
