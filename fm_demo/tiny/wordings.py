"""How people ask: question templates per task, each split into training and held-out wordings.

A template holds fields ({a} and {b} numbers, {w} a word, {c} a country, {form}/{topic} for
creative requests). `phrase` fills one in and dresses it the way people type: a polite prefix or
a word of thanks, all lower case, no final punctuation. The held-out part of every list (second
tuple) is fixed for all seeds, like the held-out number pairs, and never appears in training
(tests/test_tiny.py checks it); the evaluation reports it separately. The second stage of training
also composes requests from parts (a frame around a command, GRAMMAR lines), none of which contains
a held-out wording whole.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

Split = tuple[tuple[str, ...], tuple[str, ...]]  # (training wordings, held-out wordings)

WORDINGS: dict[str, Split] = {
    "add": ((
        "What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.", "{a} + {b} = ?",
        "What is {a} plus {b}?", "{a} plus {b}", "{a}+{b}", "Calculate {a} + {b}.", "What's {a} plus {b}?",
        "What is the sum of {a} and {b}?", "How much is {a} plus {b}?", "Add {a} to {b}.",
        "What do you get if you add {a} and {b}?", "Tell me {a} plus {b}.", "Find {a} + {b}.",
        "Work out {a} + {b}.", "Can you add {a} and {b}?", "{a} + {b}", "Sum of {a} and {b}?",
        "What does {a} plus {b} make?", "Please add {a} and {b} together.",
    ), (
        "How much do {a} and {b} make added together?", "Solve {a} + {b} for me.",
        "Give me the total of {a} and {b}.", "{a} plus {b} equals what?", "What's the answer to {a} + {b}?",
    )),
    "sub": ((
        "What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}.", "{a} - {b} = ?",
        "What is {a} minus {b}?", "{a} minus {b}", "{a}-{b}", "Calculate {a} - {b}.",
        "What's {a} take away {b}?", "What is the difference between {a} and {b}?",
        "How much is {a} minus {b}?", "Take {b} away from {a}.", "What do you get if you subtract {b} from {a}?",
        "Find {a} - {b}.", "Work out {a} minus {b}.", "Can you subtract {b} from {a}?", "{a} - {b}",
        "What does {a} minus {b} make?", "What is {a} take away {b}?",
    ), (
        "How much is left if you take {b} away from {a}?", "Solve {a} - {b} for me.",
        "{a} minus {b} equals what?", "What's the answer to {a} - {b}?", "Please subtract {b} from {a} for me.",
    )),
    # the reply follows the wording (tasks.compare_reply): "Is {a} ...?" gets yes or no; smaller/less asks
    # for the smaller number
    "compare": ((
        "Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?", "Which is smaller, {a} or {b}?",
        "Which number is less: {a} or {b}?", "Is {a} greater than {b}?", "Is {a} bigger than {b}?",
        "Is {a} less than {b}?", "Is {a} smaller than {b}?", "Which is greater: {a} or {b}?",
        "What is the larger number, {a} or {b}?", "Compare {a} and {b}.", "{a} or {b}, which is bigger?",
        "Is {a} more than {b}?", "Which one is bigger, {a} or {b}?", "Which is the smaller number: {a} or {b}?",
        "{a} or {b}, which is smaller?", "Which is less, {a} or {b}?", "Is {a} larger than {b}?",
    ), (
        "Out of {a} and {b}, which one is larger?", "Between {a} and {b}, which is smaller?",
        "Tell me the bigger number: {a} or {b}.", "Would you say {a} is greater than {b}?",
        "{a} vs {b}: which is less?",
    )),
    "capital": ((
        "What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?",
        "What's the capital of {c}?", "capital of {c}", "{c} capital", "What city is the capital of {c}?",
        "Tell me the capital of {c}.", "Do you know the capital of {c}?", "What is the capital city of {c}?",
        "Which city is the capital city of {c}?", "The capital of {c} is?", "Capital city of {c}?",
    ), (
        "I would like to know the capital of {c}.", "Can you name the capital of {c}?",
        "What's the name of the capital of {c}?", "Which is the capital city in {c}?",
    )),
    "spell": ((
        "Spell the word {w}.", "How do you spell {w}?", "Spell {w} letter by letter.", "spell {w}",
        "Can you spell {w}?", "How is {w} spelled?", "What are the letters in {w}?", "Spell out {w}.",
        "Please spell the word {w}.", "Write {w} letter by letter.", "How do I spell the word {w}?",
        "What is the spelling of {w}?", "Spell the word {w} for me.",
    ), (
        "Could you spell out the word {w}?", "Give me the spelling of {w}.", "Tell me how to spell {w}.",
        "How is the word {w} spelled, letter by letter?",
    )),
    "reverse": ((
        "Reverse the letters of {w}.", "Write {w} backwards.", "Spell {w} in reverse.",
        "Spell the word {w} backwards.", "Reverse {w}.", "What is {w} backwards?", "{w} backwards",
        "How do you spell {w} backwards?", "Can you reverse the word {w}?", "Write the word {w} in reverse.",
        "Spell {w} backwards.", "Reverse the word {w}.", "What is {w} spelled backwards?",
    ), (
        "What do you get if you reverse {w}?", "Give me {w} spelled backwards.",
        "Could you write the word {w} backwards?", "Tell me the letters of {w} in reverse.",
    )),
    "count": ((
        "How many letters are in the word {w}?", "Count the letters in {w}.", "How long is the word {w}?",
        "How many letters does {w} have?", "Number of letters in {w}?", "Count the letters of the word {w}.",
        "How many characters are in {w}?", "What is the length of the word {w}?", "letters in {w}",
        "How many letters in {w}?", "How many letters does the word {w} have?",
    ), (
        "Tell me how many letters {w} has.", "Can you count the letters of {w}?",
        "What's the number of letters in the word {w}?", "Count how many letters the word {w} has.",
    )),
    "remember": ((
        "Remember the word {w}.", "Please remember the word {w}.", "Remember this word: {w}.",
        "Keep the word {w} in mind.", "Remember {w}.", "Memorize the word {w}.",
    ), (
        "Can you remember the word {w} for me?", "I want you to remember the word {w}.",
    )),
    "recall": ((
        "Which word did I ask you to remember?", "What was the word I told you to remember?",
        "Which word did I tell you to remember?", "What word did I ask you to remember?",
        "Do you remember the word?", "What was the word?",
    ), (
        "Can you tell me the word I asked you to remember?", "Which word was I asking you to remember?",
    )),
    # out of scope: numbers the model cannot work with
    "multiply": ((
        "What is {a} times {b}?", "Multiply {a} by {b}.", "{a} * {b}", "What is {a} * {b}?",
        "Divide {a} by {b}.", "What is {a} / {b}?", "{a} divided by {b}", "What is {a} multiplied by {b}?",
    ), (
        "How much is {a} times {b}?", "Can you divide {a} by {b}?",
        "What do you get when you multiply {a} by {b}?",
    )),
    "creative": ((
        "Write a {form} about {topic}.", "Tell me a {form} about {topic}.", "Can you write a {form}?",
        "Make up a {form} about {topic}.", "Write me a {form}.", "Tell me a {form}.",
        "I want a {form} about {topic}.",
    ), (
        "Compose a {form} on {topic}.", "Could you come up with a {form} about {topic}?",
    )),
}

# Decoration around a question; prefixes that end in "," or a plain word lead into lower case.
PREFIXES: Split = (
    ("Please ", "Please, ", "Hi, ", "Hello! ", "Hey, ", "Quick question: ", "Tell me: ", "Question: ",
     "Excuse me, ", "Can you help? ", "I need help. ", "OK, ", "So ", "Now "),
    ("Hey there, ", "Good evening! ", "One more question: ", "Sorry to bother you, "),
)
SUFFIXES: Split = (
    (" please", " Thanks!", " Thank you.", " thanks", " It is for my homework."),
    (" Many thanks!", " I am curious."),
)
# More of them in the second stage of training only (with the composed requests, see `framed`).
WIDE_PREFIXES = ("Hi there! ", "Good morning, ", "Good afternoon. ", "Dear assistant, ", "Next question: ",
                 "Another one: ", "I wonder, ", "Yo, ", "Quick one: ", "Pardon me, ", "Hello again! ", "Well, ",
                 "Okay so ", "Right, ", "Hmm, ", "Let me ask: ")
WIDE_SUFFIXES = (" Cheers!", " I am learning English.", " I am a student.", " It is for school.", " Just wondering.",
                 " If you can.", " No rush.", " My friend asked me.", " I forgot.", " Be quick!",
                 " I want to check my answer.", " Thank you so much.")


# Requests are also built from two parts, the way people combine them: a frame ("Could you ...?",
# "I need you to ...") around a task's command ("spell the word {w}"). Only in training, and a
# combination that would contain a held-out wording is never made (`_unseen` checks it), so the
# held-out wordings stay unseen as wholes; what they share with training is single words and parts.
FRAMES = ("Could you {cmd}?", "Can you {cmd}?", "Would you {cmd}?", "Please {cmd}.", "I would like you to {cmd}.",
          "I need you to {cmd}.", "Help me {cmd}.", "{cmd}, please.", "Try to {cmd}.", "Will you {cmd}?",
          "Go ahead and {cmd}.", "Now {cmd}.", "{cmd} for me.", "Kindly {cmd}.", "{cmd}.", "Let me see you {cmd}.",
          "I am asking you to {cmd}.", "Your task: {cmd}.")
COMMANDS = {
    "add": ("add {a} and {b}", "add {a} to {b}", "work out {a} plus {b}", "find the sum of {a} and {b}",
            "tell me what {a} plus {b} is", "calculate {a} + {b}", "add up {a} and {b}", "solve {a} plus {b}"),
    "sub": ("subtract {b} from {a}", "take {b} away from {a}", "work out {a} minus {b}", "calculate {a} - {b}",
            "tell me what {a} minus {b} is", "find {a} minus {b}", "solve {a} minus {b}"),
    "compare": ("tell me which is larger, {a} or {b}", "tell me which is smaller, {a} or {b}",
                "say which number is bigger: {a} or {b}", "pick the larger number: {a} or {b}",
                "pick the smaller of {a} and {b}", "check if {a} is greater than {b}",
                "check whether {a} is less than {b}", "tell me if {a} is bigger than {b}",
                "say whether {a} is smaller than {b}", "find the bigger one of {a} and {b}"),
    "capital": ("name the capital of {c}", "tell me the capital of {c}", "give the capital city of {c}",
                "say what the capital of {c} is", "find the capital of {c}", "name the capital city in {c}"),
    "spell": ("spell {w}", "spell the word {w}", "spell {w} out", "write out {w} letter by letter",
              "give the letters of {w}", "write the letters of the word {w}", "spell the word {w} out loud"),
    "reverse": ("reverse {w}", "reverse the word {w}", "write {w} backwards", "spell {w} backwards",
                "write the word {w} in reverse", "turn the word {w} around", "give {w} backwards"),
    "count": ("count the letters in {w}", "count the letters of the word {w}", "tell me how long the word {w} is",
              "find the number of letters in {w}", "say how many letters {w} has", "count the letters of {w}"),
    "remember": ("remember the word {w}", "keep {w} in mind", "memorize the word {w}", "remember {w}"),
}
# Requests composed from parts, for every task: "[a|b]" is a choice, "[|b]" an optional part, so
# one line stands for every lead x expression x tail ("What's {a} plus {b} equals what?" has the
# parts "What's", "{a} plus {b}" and " equals what?"). Like the frames, they are training-only and
# filtered (`_unseen`): no combination contains a held-out wording, prefix or suffix.
_AQ = ("[What is|What's|How much is|Tell me|Give me|What's the result of|What is the answer to|Do you know|And|"
       "So what is|Now what is|Solve|Compute|Calculate|Work out|Find|Quick,|]")
_TAIL = "[?|.|| equals?| equals what?| is what?| = ?|, please.| for me.| please?| exactly?]"
_BIG = "[larger|bigger|greater|higher|smaller|less|lower]"
_W = "[|the word ]{w}"
GRAMMAR: dict[str, tuple[str, ...]] = {
    "add": (
        _AQ + " [{a} plus {b}|{a} + {b}|{a}+{b}|the sum of {a} and {b}|the total of {a} and {b}|"
        "{a} and {b} added together|{a} added to {b}]" + _TAIL,
        "[What does|How much does] {a} plus {b} [make|equal|give]?",
        "[How much do|What do] {a} and {b} [make|come to|add up to][| together]?",
        "If you add {a} and {b}, what [do you get|is the total|is the sum]?",
        "Add [|up ]{a} and {b}[| together][.|?| please.| for me.]",
        ("[I want to know|I need to know|Please tell me|Can you tell me|Could you tell me] [what {a} plus {b} is|"
         "the sum of {a} and {b}|how much {a} plus {b} is|the total of {a} and {b}][.|?]"),
    ),
    "sub": (
        _AQ + " [{a} minus {b}|{a} - {b}|{a}-{b}|{a} take away {b}|{b} subtracted from {a}|"
        "{b} taken away from {a}]" + _TAIL,
        "[What does|How much does] {a} minus {b} [make|equal|give]?",
        "If you [take|subtract] {b} [from|away from] {a}, what [is left|do you get]?",
        "What is left [when you take|after taking|after you subtract] {b} [from|away from] {a}?",
        "Subtract {b} from {a}[.|?| please.| for me.]",
        ("[I want to know|I need to know|Please tell me|Can you tell me|Could you tell me] [what {a} minus {b} is|"
         "how much {a} minus {b} is|what is left when you take {b} from {a}][.|?]"),
    ),
    # compare_reply reads the kind of answer off the template (yes or no, the smaller, the larger)
    "compare": (
        "[Which is|Which number is|Which one is|Which of the two is|Tell me which is|Say which one is|"
        "Which of them is] " + _BIG + "[, {a} or {b}?|: {a} or {b}?|, {a} or {b}|: {a} or {b}]",
        ("[What is|Which is|Tell me|Give me] the [larger|bigger|greater|higher|smaller|lower] [number|one]"
         "[, {a} or {b}?|: {a} or {b}?| of {a} and {b}?| out of {a} and {b}?|: {a} or {b}.]"),
        "[Of|Between|Out of|From] {a} and {b}, [which|which one|which number] is [|the ]" + _BIG + "?",
        "{a} or {b}[,|:|?] which [is|one is|number is] " + _BIG + "?",
        "{a} [vs|vs.|versus] {b}[,|:|?] which [is|one is] " + _BIG + "?",
        ("[Would you say|Do you think|Is it true that|Tell me if|Can you tell me if|Am I right that|"
         "True or false:|Check if|I think] {a} is [greater|bigger|larger|more|higher|smaller|less|lower] than {b}[?|.|]"),
        "Is {a} [greater|bigger|larger|more|higher|smaller|less|lower] than {b}[?| or not?|, right?]",
    ),
    "capital": (
        ("[What is|What's|Tell me|Name|Give me|Do you know|Can you tell me|Could you tell me|I want to know|"
         "I'd like to know|Please tell me|Say] the capital [|city ][of|in] {c}[?|.|]"),
        "The capital of {c}[?| is what?| is?]", "What city is the capital [|city ]of {c}?",
        "Which city is [the capital|the capital city|the main city] of {c}?",
    ),
    "spell": (
        "[Spell|Can you spell|Could you spell|Please spell|How do you spell|How do I spell|How to spell|"
        "Show me how to spell|I want to know how to spell] " + _W + "[?|.||, letter by letter.| out.| for me.]",
        "[What is|What's|Give me|Tell me] the spelling of " + _W + "[?|.]",
        "[What are|Give me|Tell me|List] the letters [in|of] " + _W + "[?|.]",
        "[Write|Say] " + _W + " letter by letter[.|?|]",
    ),
    "reverse": (
        ("[Reverse|Can you reverse|Please reverse|Flip|Turn around] [|the word |the letters of |the letters in ]{w}"
         "[?|.|| for me.]"),
        "[Spell|Write|Give me|Say|Tell me] " + _W + " [backwards|in reverse|back to front|reversed][?|.|| please.]",
        "What is " + _W + " [backwards|reversed|in reverse|spelled backwards][?|]",
        "How do you [spell|write] " + _W + " [backwards|in reverse]?",
        "What do you get when you [reverse|flip] " + _W + "?",
        "[Give me|Tell me|What are] the letters of " + _W + " [backwards|in reverse][.|?]",
    ),
    "count": (
        "How many [letters|characters] [are in|are there in] " + _W + "[?|.|]",
        "How many [letters|characters] does " + _W + " have[?|]",
        "[Count|Please count|Can you count] the [letters|characters] [in|of] " + _W + "[?|.|]",
        "What is the [length|number of letters] of " + _W + "[?|]",
        "[Tell me|Say|I want to know] how many letters " + _W + " has[.|?|]",
        "How long is " + _W + "[?|]", "{w}: how many letters?", "Length of " + _W + "?",
    ),
    # out of scope
    "multiply": (
        ("[What is|What's|How much is|Compute|Calculate|Tell me|Work out] {a} [times|multiplied by|divided by|over|"
         "x|*|/] {b}[?|.|]"),
        "[Multiply|Divide] {a} by {b}[.|?| please.| for me.]", "What is {a} [squared|cubed][?|]",
    ),
    "creative": (
        ("[Write|Tell me|Make up|Can you write|Give me|I want|Please write|Create|Can you tell me] a {form}"
         "[ about {topic}| for me|][.|?|]"),
        "[I need|I would love|Write me] a [short |funny |sad |]{form}[ about {topic}|][.|!|]",
    ),
}
# Falcon Mamba questions composed the same way, one tuple per entry of tables.FALCON_FACTS.
FALCON_GRAMMAR: tuple[tuple[str, ...], ...] = (
    (("[What is|What's|Tell me about|Explain|Describe|Can you describe|Could you explain|Give me an overview of|"
      "What do you know about|I want to know about] Falcon Mamba[?|.|]"),
     "What kind of [model|thing] is Falcon Mamba?", "Give me a [short |quick |brief |]description of Falcon Mamba[.|?]"),
    ("Who [made|created|built|developed|trained|released|designed] Falcon Mamba?",
     ("Which [team|company|lab|institute|organization|group] [made|created|built|developed|trained|released] "
      "Falcon Mamba?"),
     "[Who|Which team|Which company|Which lab|Which institute] is behind Falcon Mamba?",
     "Where [does Falcon Mamba come from|was Falcon Mamba made|was Falcon Mamba developed]?",
     "Who are the [makers|creators|authors|developers] of Falcon Mamba?"),
    ("[Does|Can] Falcon Mamba [use|have|need] attention[| layers]?",
     "Is Falcon Mamba [a transformer|built with attention|based on attention|an attention model]?",
     "Is there [any |]attention in Falcon Mamba?", "Does Falcon Mamba [use|have] self-attention?"),
    ("How many [parameters|weights|params] does Falcon Mamba have?", "How [big|large] is Falcon Mamba?",
     "What is the [size|parameter count|number of parameters|model size] of Falcon Mamba?",
     "How many [parameters|weights] are in Falcon Mamba?", "What size is Falcon Mamba?",
     "[Tell me|Give me|What's|Do you know] the [parameter count|size|number of weights] of Falcon Mamba[?|.]",
     "Falcon Mamba's [size|parameter count]?"),
    ("Is Falcon Mamba good [for|with] long [texts|contexts|documents|conversations|prompts]?",
     ("How does Falcon Mamba [handle|deal with|cope with] [long texts|a long context|long documents|"
      "long conversations]?"),
     "Does the memory of Falcon Mamba grow with the [context|text|conversation]?",
     "How much memory does Falcon Mamba need for a long [text|context|document|conversation]?",
     "Why is Falcon Mamba good for long [texts|contexts|conversations]?",
     "Does Falcon Mamba need more memory for [long texts|a longer context|long conversations]?",
     "Can Falcon Mamba read long [texts|documents]?"),
    (("What architecture [does Falcon Mamba use|is Falcon Mamba|is behind Falcon Mamba|is Falcon Mamba built on|"
      "does Falcon Mamba have]?"),
     "On which architecture is Falcon Mamba [based|built]?", "What is Falcon Mamba [based on|built on]?",
     "Which architecture [is Falcon Mamba|does Falcon Mamba use]?",
     "What kind of architecture does Falcon Mamba [use|have]?",
     "What [design|technology|architecture|idea] [is behind|powers|drives] Falcon Mamba?"),
    ("Are you [Falcon Mamba|Falcon Mamba 7B|the real Falcon Mamba|the real Falcon Mamba 7B|the big Falcon Mamba]?",
     "[Which|What] model [are you|is this|am I talking to|am I chatting with]?", "[Who|What] are you?",
     "Who am I talking to?", "Is this [Falcon Mamba|the real Falcon Mamba|the real Falcon Mamba 7B]?",
     "Am I talking to [the real Falcon Mamba|Falcon Mamba 7B]?", "You are the real Falcon Mamba[?| 7B, right?]"),
)
# Open questions composed the same way (tables.OPEN_QUESTIONS holds the written ones).
OPEN_GRAMMAR: tuple[str, ...] = (
    ("[Why|How] [do|can] [cats|dogs|airplanes|fish|penguins|people|trees|bees|stars|rivers|computers|babies|clouds]"
     " [purr|fly|swim|sleep|live|grow|work|shine|move|learn|talk|rain]?"),
    ("What is [a black hole|an atom|a volcano|a rainbow|a galaxy|democracy|the economy|a vaccine|gravity|love|time|"
     "happiness|money|science|physics|history]?"),
    ("How do I [fix|clean|learn|cook|find|make|paint|build|choose|start] [my bike|a cake|French|rice|a job|friends|"
     "a wall|a website|a garden|a business]?"),
    "What should I [eat|cook|watch|read|wear|buy|do|learn] [today|tonight|for dinner|this week|next]?",
    ("Who [invented|discovered|painted|wrote|built|won] [the telephone|the radio|the wheel|the Mona Lisa|Hamlet|"
     "the first car|the World Cup]?"),
    ("[Tell me about|Explain|Describe] [dinosaurs|the Roman Empire|the ocean|volcanoes|history|the weather|your day|"
     "space travel][.|]"),
    "Where do [penguins|bears|whales|people|kangaroos|tigers] live?",
    "Can you [sing|dance|play chess|cook|drive|see me|paint|tell the time]?",
    "Do you [like|have|want] [music|feelings|friends|a name|pizza|dreams]?",
    "What is your [name|favorite food|favorite color|age|job|opinion]?",
)

# Share of training requests built from parts (a frame around a command, or a GRAMMAR line): 0
# unless set by `framed` (the second stage of training, train.py --framed). 0 draws nothing from
# the generator, so the first stage's data stream is the same as without them.
FRAMED = 0.0


@contextmanager
def framed(share: float) -> Iterator[None]:
    """Build `share` of the training requests made inside the block from parts."""
    global FRAMED
    before, FRAMED = FRAMED, share
    try:
        yield
    finally:
        FRAMED = before


def expand(spec: str) -> tuple[str, ...]:
    """Every sentence of a GRAMMAR line, spaces tidied and the first letter upper case."""
    m = re.search(r"\[([^\[\]]*)\]", spec)
    if m is None:
        text = " ".join(spec.split())
        return (text[0].upper() + text[1:],)
    return tuple(s for alt in m.group(1).split("|") for s in expand(spec[:m.start()] + alt + spec[m.end():]))


@cache
def _held_out() -> re.Pattern:
    """One regex for every held-out wording, prefix, suffix, Falcon question and open question (the
    normalized template anywhere in the normalized request) and every held-out unknown word, country,
    creative form and topic (as a whole word), as tests/test_tiny.py looks for them."""
    from .tables import CREATIVE, FALCON_FACTS, OPEN_QUESTIONS, UNKNOWN_COUNTRIES, UNKNOWN_WORDS

    held = ([t for _, test in WORDINGS.values() for t in test] + [q for _, test, _ in FALCON_FACTS for q in test]
            + list(PREFIXES[1]) + list(SUFFIXES[1]) + list(OPEN_QUESTIONS[1]))
    names = UNKNOWN_WORDS[1] + UNKNOWN_COUNTRIES[1] + CREATIVE[1][0] + CREATIVE[1][1]
    return re.compile("|".join([f"(?:{pattern(t).pattern})" for t in held]
                               + [rf"(?:(?:^| ){re.escape(normalize(n))}(?:$| ))" for n in names]))


def _unseen(templates) -> tuple[str, ...]:
    """The templates that contain no held-out part, bare or dressed with a training prefix or suffix."""
    held = _held_out()

    def clean(t: str) -> bool:
        text = t.format(a="12", b="7", w="river", c="spain", form="poem", topic="the sea")
        dressed = ([text] + [p + text for p in PREFIXES[0] + WIDE_PREFIXES]
                   + [text + s for s in SUFFIXES[0] + WIDE_SUFFIXES])
        return not any(held.search(normalize(d)) for d in dressed)

    return tuple(dict.fromkeys(t for t in templates if clean(t)))


@cache
def wide(task: str) -> tuple[tuple[str, ...], ...]:
    """The second stage's composed requests of `task`, in families (frames x commands, GRAMMAR)."""
    framed_ = [s for f in FRAMES for c in COMMANDS.get(task, ()) for s in expand(f.format(cmd=c))]
    composed = [s for line in GRAMMAR.get(task, ()) for s in expand(line)]
    return tuple(f for f in (_unseen(framed_), _unseen(composed)) if f)


@cache
def falcon_wide(fact: int) -> tuple[str, ...]:
    """The second stage's composed questions for tables.FALCON_FACTS[fact]."""
    return _unseen(s for line in FALCON_GRAMMAR[fact] for s in expand(line))


@cache
def open_wide() -> tuple[str, ...]:
    """The second stage's composed open questions (out of scope)."""
    return _unseen(s for line in OPEN_GRAMMAR for s in expand(line))


def composed(rng: random.Random, wording: str, family: Callable[[], tuple[tuple[str, ...], ...]]) -> str | None:
    """In the second stage (a FRAMED share of training requests), a composed request drawn from
    `family()`'s families, else None (always None for a task without any)."""
    if not (FRAMED and wording == "train" and (families := family()) and rng.random() < FRAMED):
        return None
    return rng.choice(rng.choice(families))


CORE = 3  # the first training wordings of each list: the whole first stage of training (curriculum)


def part(split: Split, which: str) -> tuple[str, ...]:
    """The training ("train"), held-out ("test") or first-stage ("core": the first CORE training
    wordings) part of a split list."""
    return split[1] if which == "test" else split[0][:CORE] if which == "core" else split[0]


def dress(rng: random.Random, text: str, wording: str) -> str:
    """Type `text` the way people do: maybe a prefix or suffix, lower case, no final punctuation
    ("core" wordings stay as written; the second stage draws from more prefixes and suffixes)."""
    if wording == "core":
        return text
    wide_ = FRAMED and wording == "train"  # the second stage: the wider choice, same draws
    if rng.random() < 0.35:
        prefix = rng.choice(part(PREFIXES, wording) + (WIDE_PREFIXES if wide_ else ()))
        if prefix[-2] not in "!.:?":
            text = text[0].lower() + text[1:]
        text = prefix + text
    if rng.random() < 0.15:
        text = text + rng.choice(part(SUFFIXES, wording) + (WIDE_SUFFIXES if wide_ else ()))
    if rng.random() < 0.25:
        text = text.lower()
    if rng.random() < 0.25:
        text = text.rstrip("?.!")
    return text


def phrase(rng: random.Random, task: str, wording: str, **fields) -> tuple[str, str]:
    """(dressed question, template) for `task` from the training or held-out wordings."""
    template = composed(rng, wording, lambda: wide(task)) or rng.choice(part(WORDINGS[task], wording))
    return dress(rng, template.format(**fields), wording), template


def normalize(text: str) -> str:
    """Lower case, words only: what tests compare when they look for a wording in training data."""
    return " ".join(re.sub(r"[^a-z0-9{}]+", " ", text.lower()).split())


def pattern(template: str) -> re.Pattern:
    """A regex that finds a (normalized) template inside a normalized message, any field values."""
    parts = re.split(r"(\{\w+\})", normalize(template))
    body = "".join(r"[a-z0-9 ]+?" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(r"(?:^| )" + body + r"(?:$| )")

